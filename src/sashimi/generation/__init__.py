"""The fast recurrent step behind `SaShiMi.step`: fused chains, compiled stages, CUDA graphs.

stepper.Stepper walks the pooled levels one sample at a time; fused.FusedChain steps a chain
of residual blocks as one pure function (what torch.compile is applied to); cuda_graphs
replays whole steps on a GPU. Measurements behind these choices: docs/performance.md.
"""
