"""Parts of the activation oracle (arXiv 2512.15674): input/output format, extraction and injection,
batches, informativeness judges, the calibrated reward, calibration metrics and the SFT format stage.

The GRPO math lives in :mod:`modules.rl.grpo`; the data reader in :mod:`datamodules.oracle_data`.
"""
