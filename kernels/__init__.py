"""Triton kernels of fastattn, shipped as `fastattn.kernels`.

Import the op modules directly (`from fastattn.kernels import softmax`); this package imports
nothing itself so that importing one op never pulls in triton for the others.
"""
