"""The contract that `export` and `serving` share, below both: tensor specs (`networks`), the model
repository's layout (`layout`), reading and writing its configs (`configs`), and the endpoint's
limits (`limits`). It imports neither of them; both import it.
"""
