"""The network: configs, layers, the key/value caches, the vision tower, and the backbone used as encoder
and decoder. Nothing here knows about sampling or serving."""

from ..kernels.mkl import warm_up_vector_maths

# Before any forward runs maths on several threads (see `kernels/mkl.py`): once per process, when the model
# is first imported.
warm_up_vector_maths()
