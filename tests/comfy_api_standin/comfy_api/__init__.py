"""Test stand-in for ComfyUI's comfy_api package (see tests/v3_standin.py)."""
