"""Nemotron-like architectures the benchmarks build with random weights (overrides of the test
checkpoints' `nemotron_rnnt` variant)."""

ARCHS = {
    # Nemotron's architecture, reduced to run on a laptop CPU.
    "reduced": dict(n_layers=8, d_model=256, n_heads=4, subsampling_conv_channels=128, pred_hidden=320, joint_hidden=320),
    # nvidia/nemotron-speech-streaming-en-0.6b: 24 x 1024, 8 heads, 256 subsampling channels, LSTM 2 x 640.
    "full": dict(n_layers=24, d_model=1024, n_heads=8, subsampling_conv_channels=256, pred_hidden=640, joint_hidden=640),
}
