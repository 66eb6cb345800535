"""Explanations (Grad-CAM and other methods) and figures."""
