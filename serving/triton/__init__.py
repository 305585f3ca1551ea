"""The Triton Python-backend models. They import `triton_python_backend_utils`, which exists only
inside the backend's stub process; everything they decide is delegated to the tested modules."""
