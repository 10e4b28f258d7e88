"""sosvae_lib: a tested reproduction of SOS-VAE.

J. Langley, M. Monteiro, C. Jones, N. Pawlowski, B. Glocker, "Structured Uncertainty in the
Observation Space of Variational Autoencoders", TMLR 2022 (arXiv 2205.12533).

Data flow, one file per concept:
data → encoder → trunk → heads → distributions → objectives → train (config, checkpoint)
→ metrics / evaluate → plots → reproduce (notebooks) → results/.
"""

__version__ = "0.1.0"
