"""Contrastive training: recipe, data, loss, GradCache, trainer and the stage runner."""
