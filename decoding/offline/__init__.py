"""Offline tools: training and distillation, the split audit, the tiny test models. The serving path never imports this package."""
