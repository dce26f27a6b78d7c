"""Detector inference: the jitted forward and its host pre- and post-processing."""
