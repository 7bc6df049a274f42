"""protect: train undistillable (CMIM) or distillation-friendly (MCMI) classifiers, measure CMI, export ONNX."""
from protect.cmi import CMIMLoss, MCMILoss, cmi_spectrum, conditional_mutual_information, normalised_cmi, separation

__all__ = ["CMIMLoss", "MCMILoss", "conditional_mutual_information", "cmi_spectrum", "separation", "normalised_cmi"]
