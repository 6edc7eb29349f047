"""SaShiMi: autoregressive and diffusion audio generation with state-space models.

A reproduction of Goel, Gu, Donahue and Re, "It's Raw! Audio Generation with
State-Space Models" (ICML 2022): the S4 layer, the SaShiMi backbone, the
WaveNet / SampleRNN / DiffWave baselines, and the paper's evaluation protocol.
"""

__version__ = "0.1.0"
