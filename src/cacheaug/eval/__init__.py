"""Evaluation: loss metrics, likelihood scoring, one file per task (mc, gsm8k), the lm-evaluation-harness model,
the runners behind `cacheaug eval` and `cacheaug report`."""

TABLE_OFFSETS = (1, 2, 4, 8, 16, 32)  # the offsets after the latents that arXiv 2412.17747 Table 1 reports
