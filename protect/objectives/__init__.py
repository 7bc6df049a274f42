"""Teacher objectives by mode name: ce, ls, cmim, mcmi, nasty."""
from protect.objectives.base import Objective
from protect.objectives.baselines import CrossEntropy, LabelSmoothing
from protect.objectives.cmi_objectives import CMIObjective, cmim, mcmi
from protect.objectives.nasty import NastyTeacher
from protect.registry import Registry

OBJECTIVES: Registry = Registry("mode")
OBJECTIVES.register("ce")(lambda num_classes, **kw: CrossEntropy())
OBJECTIVES.register("ls")(lambda num_classes, epsilon=0.1, **kw: LabelSmoothing(epsilon))
OBJECTIVES.register("cmim")(cmim)
OBJECTIVES.register("mcmi")(mcmi)
OBJECTIVES.register("nasty")(lambda num_classes, reference, tau=4.0, omega=0.04, **kw: NastyTeacher(reference, tau, omega))

__all__ = ["OBJECTIVES", "Objective", "CrossEntropy", "LabelSmoothing", "CMIObjective", "NastyTeacher", "cmim", "mcmi"]
