"""The fixed texts visual chain of thought adds to a user's question (flmm.md 8).

Kept apart from the grounder so that the demo world can teach its LMM the same words
without importing the model code.
"""
from __future__ import annotations

VCOT_HINT = "First think which object in this image is most relevant to the question."
VCOT_LEAD = "The object most relevant to the question is"
VCOT_REGION = "The second image is the image region that might help you answer the question."
VCOT_REGION_ALONE = "This is the image region that might help you answer the question."
