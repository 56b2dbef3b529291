"""Our parameter names -> detectron2 / official-release names, written independently of the converters (their
inverse), for round-trip tests of ``proscale/convert``."""

TO_DETECTRON2 = [
    (r"backbone\.body\.conv1\.weight", "backbone.stem.conv1.weight"),
    (r"backbone\.body\.bn1\.(\w+)", r"backbone.stem.conv1.norm.\1"),
    (
        r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight",
        lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)",
        lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
    ),
    (
        r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight",
        lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.weight",
    ),
    (
        r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)",
        lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
    ),
    (r"backbone\.body\.patch_embed\.(.+)", r"backbone.patch_embed.\1"),
    (r"backbone\.body\.layers_(\d)\.blocks\.(.+)", r"backbone.layers.\1.blocks.\2"),
    (r"backbone\.body\.layers_(\d)\.downsample\.(.+)", lambda m: f"backbone.layers.{int(m[1]) - 1}.downsample.{m[2]}"),
    (r"backbone\.output_norms\.(\d)\.(\w+)", r"backbone.norm\1.\2"),
    (r"pixel_decoder\.encoder\.embed\.level_embed", "sem_seg_head.pixel_decoder.transformer.level_embed"),
    (r"pixel_decoder\.encoder\.(.+)", r"sem_seg_head.pixel_decoder.transformer.encoder.\1"),
    (r"pixel_decoder\.(adapter_1|layer_1)\.0\.weight", r"sem_seg_head.pixel_decoder.\1.weight"),
    (r"pixel_decoder\.(adapter_1|layer_1)\.1\.(\w+)", r"sem_seg_head.pixel_decoder.\1.norm.\2"),
    (r"pixel_decoder\.(.+)", r"sem_seg_head.pixel_decoder.\1"),
    (r"transformer_decoder\.(.+)", r"sem_seg_head.predictor.\1"),
]
