"""ACID, active curation of the training data for distillation [P §2.5; ACID, Udandarao et al., arXiv 2411.18674].

A small model's last boost, by data a bigger frozen teacher chooses: each step keeps the
examples of a super-batch with the highest learnability (the learner's pair losses minus the
teacher's). `selection`: the selection maths (JEST's joint selection and the ablations),
plain tensors; `teacher`: the frozen teacher's loading, inputs and embedding cache;
`python -m siglip2.acid cache`: that cache's builder (`__main__`). The training stage is
`stages/acid.py`. This package sits above `siglip2.model`, `siglip2.checkpoint` and
`siglip2.export`; `siglip2.data` imports nothing from it.
"""

from siglip2.acid.selection import (
    METHODS,
    CurationConfig,
    chunk_sizes,
    gumbel,
    independent_select,
    joint_select,
    random_select,
    select,
)
from siglip2.acid.teacher import TeacherCache, build_teacher_cache, load_teacher, refit_text_length, teacher_inputs

__all__ = [
    "METHODS",
    "CurationConfig",
    "chunk_sizes",
    "gumbel",
    "joint_select",
    "independent_select",
    "random_select",
    "select",
    "load_teacher",
    "refit_text_length",
    "teacher_inputs",
    "TeacherCache",
    "build_teacher_cache",
]
