"""Companion methods of the scProto family (method.md §10), built from the same pieces.

- scGPCL clustering (:mod:`.scgpcl`): feature-masking views, NT-Xent, prototypical contrastive
  loss against multi-granularity k-means centroids, ZINB reconstruction, DEC fine-tuning.
- Supervised contrastive annotation heads MLP-CL / MLS-CL (:mod:`.heads`, :mod:`.annotate`).
"""
