"""Small versions of the paper's backbones, same code paths, for tests that build many models."""

# Swin-T's architecture (windows, patch merging, relative position bias) at embed 32, depths 1-1-2-1
SMALL_SWIN = dict(
    model_name="swin_tiny_patch4_window7_224",
    embed_dim=32,
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 4, 8),
    strict_img_size=False,
    always_partition=True,
)
