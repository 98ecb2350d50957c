"""The network: configs, layers, the key/value caches, the vision tower, and the backbone used as encoder
and decoder. Nothing here knows about sampling or serving."""
