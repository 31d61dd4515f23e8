"""Seeing inside the networks, after Zeiler & Fergus 2014 ("Visualizing and understanding convolutional
networks"): deconvnet projections, first-layer filters, feature maps, occlusion sensitivity, receptive
fields, invariance curves and the evolution of features during training.

    python -m lightcnn.visualize zfnet --checkpoint run.ckpt --images a.jpg b.jpg --layers conv1 conv5
    python -m lightcnn.visualize --help

    from lightcnn.visualize import load_model, load_images, visualize
    model = load_model("lenet5", "runs/lenet5_digits/RUN/checkpoints/last.ckpt")
    x, labels = load_images(["digits:0", "digits:1"], model)
    visualize(model, x, "pictures/", labels=labels)   # + what=["gradcam", "guided", "erf"] for any network
"""
from lightcnn.visualize.api import WHAT, default_layers, feature_evolution, visualize
from lightcnn.visualize.attribution import attribute, effective_receptive_field
from lightcnn.visualize.callback import FeatureSnapshots
from lightcnn.visualize.core import (
                                     load_images,
                                     load_model,
                                     receptive_field_table,
                                     receptive_fields,
                                     resolve_layer,
                                     trace_chain,
)
from lightcnn.visualize.deconvnet import project, project_strongest

__all__ = ["WHAT", "FeatureSnapshots", "attribute", "default_layers", "effective_receptive_field",
           "feature_evolution", "load_images", "load_model", "project", "project_strongest", "receptive_field_table",
           "receptive_fields", "resolve_layer", "trace_chain", "visualize"]
