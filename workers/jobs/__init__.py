"""Offline jobs that build and judge a model bundle: dataset hygiene and splits,
the colour-histogram reference index, CNN transfer learning, the fusion tree,
the evaluation report and Grad-CAM explanations.

The heavy steps (decoding, hashing, feature extraction, training, scoring) run
as Ray tasks, so the same commands use one laptop or a whole Ray cluster. They
share one decode path with the streaming pipeline (common.decode with the
pipeline's draft size, common.features), so what the models learn offline is
what they see online.
"""
