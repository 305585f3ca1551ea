"""Deployment: the container image (Dockerfile), the Helm chart (helm/sdxl-triton) and the tools that
render and check it offline (render.py, validate.py; run in the .venv-deploy environment)."""
