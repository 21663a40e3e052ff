"""Tiny KerasHub backbones of many families, built offline from config.

`FAMILIES` maps a family name to a builder returning `(backbone, inputs)`:
a backbone of a few thousand to a few hundred thousand weights (hidden size
8 to 16, one or two blocks, images of 16 to 64 pixels) and a dict (or array)
of NumPy inputs for it. Nothing is downloaded: every model comes from its
constructor's arguments.

`TARGETS` names each family's default LoRA targets: `"all-linear"` (every
Dense and EinsumDense except the output layers) for transformers, the
convolutions (`conv_layers`) for CNNs.
"""

import keras
import keras_hub
import numpy as np

models = keras_hub.models


def conv_layers(layer):
    """The default targets of a CNN: its Conv2D and DepthwiseConv2D layers."""
    return isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))


def linear_layers(layer):
    """Every Dense and EinsumDense: what `"all-linear"` means on a backbone
    with no head, for the families where `"all-linear"` selects nothing
    (their output is produced by a layer holding all the blocks; see
    `docs/families.md`)."""
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))


def _images(size, batch=2, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(batch, size, size, channels)).astype("float32")


def _tokens(batch=2, seq=8, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, size=(batch, seq)).astype("int32")


def _mask(batch=2, seq=8):
    mask = np.ones((batch, seq), "int32")
    mask[-1, -1] = 0
    return mask


# Vision transformers ------------------------------------------------------


def vit():
    model = models.ViTBackbone(
        image_shape=(16, 16, 3),
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    return model, _images(16)


def deit():
    model = models.DeiTBackbone(
        image_shape=(16, 16, 3),
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    )
    return model, _images(16)


def dinov2():
    model = models.DINOV2Backbone(
        patch_size=4,
        num_layers=1,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(16, 16, 3),
        position_embedding_shape=(16, 16, 3),
    )
    return model, {"images": _images(16)}


def dinov3():
    model = models.DINOV3Backbone(
        patch_size=4,
        num_layers=1,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(16, 16, 3),
    )
    return model, {"pixel_values": _images(16)}


def _siglip_parts():
    vision = models.SigLIPVisionEncoder(
        patch_size=8,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(16, 16, 3),
    )
    text = models.SigLIPTextEncoder(
        vocabulary_size=64,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    return vision, text


def siglip():
    vision, text = _siglip_parts()
    model = models.SigLIPBackbone(vision, text)
    return model, {"images": _images(16), "token_ids": _tokens()}


def clip():
    vision = models.CLIPVisionEncoder(
        patch_size=8,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(16, 16, 3),
    )
    text = models.CLIPTextEncoder(
        vocabulary_size=64,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    model = models.CLIPBackbone(vision, text, projection_dim=16)
    return model, {"images": _images(16), "token_ids": _tokens()}


def sam():
    encoder = models.ViTDetBackbone(
        hidden_size=16,
        num_layers=2,
        intermediate_dim=32,
        num_heads=2,
        global_attention_layer_indices=[1],
        image_shape=(64, 64, 3),
        patch_size=16,
        num_output_channels=8,
        window_size=2,
    )
    prompt = keras_hub.layers.SAMPromptEncoder(
        hidden_size=8,
        image_embedding_size=(4, 4),
        input_image_size=(64, 64),
        mask_in_channels=4,
    )
    decoder = keras_hub.layers.SAMMaskDecoder(
        hidden_size=8,
        num_layers=1,
        intermediate_dim=16,
        num_heads=2,
        embedding_dim=8,
        num_multimask_outputs=3,
        iou_head_depth=2,
        iou_head_hidden_dim=8,
    )
    model = models.SAMBackbone(encoder, prompt, decoder)
    rng = np.random.default_rng(0)
    inputs = {
        "images": _images(64, batch=1),
        "points": rng.uniform(0, 64, size=(1, 2, 2)).astype("float32"),
        "labels": np.array([[1, 0]], "float32"),
        "boxes": np.zeros((1, 0, 2, 2), "float32"),
        "masks": np.zeros((1, 0, 16, 16, 1), "float32"),
    }
    return model, inputs


def swin():
    model = models.SwinTransformerBackbone(
        image_shape=(32, 32, 3),
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=4,
        patch_size=4,
        mlp_ratio=2.0,
        drop_path=0.0,
    )
    return model, _images(32)


# CNNs ---------------------------------------------------------------------


def resnet():
    model = models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=(16, 16, 3),
    )
    return model, _images(16)


def deeplabv3():
    encoder = models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=(32, 32, 3),
    )
    model = models.DeepLabV3Backbone(
        image_encoder=encoder,
        spatial_pyramid_pooling_key="P3",
        upsampling_size=2,
        dilation_rates=[1, 2],
        low_level_feature_key="P2",
        projection_filters=8,
        image_shape=(32, 32, 3),
    )
    return model, _images(32)


def efficientnet():
    model = models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 2],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["v1", "v1"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        dropout=0.0,
        input_shape=(16, 16, 3),
    )
    return model, _images(16)


def mobilenet():
    model = models.MobileNetBackbone(
        stackwise_expansion=[[1], [2]],
        stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]],
        stackwise_kernel_size=[[3], [3]],
        stackwise_num_strides=[[2], [1]],
        stackwise_se_ratio=[[0.25], [None]],
        stackwise_activation=[["relu"], ["hard_swish"]],
        stackwise_padding=[[1], [1]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=32,
        squeeze_and_excite=0.5,
        image_shape=(32, 32, 3),
        input_num_filters=8,
    )
    return model, _images(32)


# Multimodal ---------------------------------------------------------------


def paligemma():
    model = models.PaliGemmaBackbone(
        vocabulary_size=64,
        image_size=16,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        vit_patch_size=8,
        vit_num_heads=2,
        vit_hidden_dim=16,
        vit_num_layers=1,
        vit_intermediate_dim=32,
    )
    seq = 4 + 8  # 4 image tokens ((16 / 8) ** 2) then the text
    inputs = {
        "images": _images(16),
        "token_ids": _tokens(seq=seq),
        "padding_mask": _mask(seq=seq),
        "response_mask": np.zeros((2, seq), "int32"),
    }
    return model, inputs


def gemma3_vision():
    vision = models.Gemma3VisionEncoder(
        image_size=16,
        patch_size=4,
        num_heads=2,
        hidden_dim=16,
        num_layers=1,
        intermediate_dim=32,
        output_dim=16,
        pool_size=2,
    )
    model = models.Gemma3Backbone(
        vocabulary_size=64,
        image_size=16,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        vision_encoder=vision,
    )
    # (16 / 4 / 2) ** 2 = 4 image tokens per image, one image per row.
    seq = 12
    positions = np.tile(np.arange(2, 6, dtype="int32"), (2, 1))
    inputs = {
        "images": _images(16)[:, None],
        "token_ids": _tokens(seq=seq),
        "padding_mask": _mask(seq=seq),
        "vision_mask": np.isin(np.arange(seq), positions[0])[None]
        .repeat(2, 0)
        .astype("int32"),
        "vision_indices": positions,
    }
    return model, inputs


# Audio --------------------------------------------------------------------


def whisper():
    model = models.WhisperBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_mels=8,
        max_encoder_sequence_length=16,
        max_decoder_sequence_length=8,
    )
    rng = np.random.default_rng(0)
    inputs = {
        "encoder_features": rng.normal(size=(2, 16, 8)).astype("float32"),
        "decoder_token_ids": _tokens(),
        "decoder_padding_mask": _mask(),
    }
    return model, inputs


def moonshine():
    model = models.MoonshineBackbone(
        vocabulary_size=64,
        filter_dim=16,
        encoder_num_layers=1,
        decoder_num_layers=1,
        hidden_dim=16,
        intermediate_dim=32,
        encoder_num_heads=2,
        decoder_num_heads=2,
        max_position_embeddings=64,
    )
    rng = np.random.default_rng(0)
    inputs = {
        "encoder_input_values": rng.normal(size=(2, 4000, 1)).astype("float32"),
        "encoder_padding_mask": np.ones((2, 4000), "int32"),
        "decoder_token_ids": _tokens(),
        "decoder_padding_mask": _mask(),
    }
    return model, inputs


# Text ---------------------------------------------------------------------


def _seq2seq_inputs():
    return {
        "encoder_token_ids": _tokens(),
        "encoder_padding_mask": _mask(),
        "decoder_token_ids": _tokens(seed=1),
        "decoder_padding_mask": _mask(),
    }


def t5():
    model = models.T5Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        dropout=0.0,
    )
    return model, _seq2seq_inputs()


def t5gemma():
    model = models.T5GemmaBackbone(
        vocabulary_size=64,
        encoder_hidden_dim=16,
        encoder_intermediate_dim=32,
        encoder_num_layers=1,
        encoder_num_attention_heads=2,
        encoder_num_key_value_heads=1,
        encoder_head_dim=8,
        encoder_layer_types=["full_attention"],
        decoder_hidden_dim=16,
        decoder_intermediate_dim=32,
        decoder_num_layers=1,
        decoder_num_attention_heads=2,
        decoder_num_key_value_heads=1,
        decoder_head_dim=8,
        decoder_layer_types=["full_attention"],
    )
    return model, _seq2seq_inputs()


def bart():
    model = models.BartBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        dropout=0.0,
        max_sequence_length=32,
    )
    return model, _seq2seq_inputs()


def smollm3():
    model = models.SmolLM3Backbone(
        vocabulary_size=64,
        hidden_dim=16,
        intermediate_dim=32,
        num_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=False,
        attention_dropout=0.0,
        rope_layer_enabled_list=[True, False],
        layer_types=["attention", "attention"],
        mlp_bias=False,
        layer_norm_epsilon=1e-6,
        max_position_embeddings=32,
        rope_theta=10000.0,
        partial_rotary_factor=1.0,
    )
    return model, {"token_ids": _tokens(), "padding_mask": _mask()}


def rwkv7():
    model = models.RWKV7Backbone(
        hidden_size=16,
        head_size=8,
        num_layers=1,
        vocabulary_size=64,
        intermediate_dim=32,
        gate_lora=4,
        mv_lora=4,
        aaa_lora=4,
        decay_lora=4,
    )
    return model, {"token_ids": _tokens(), "padding_mask": _mask()}


# Diffusion ----------------------------------------------------------------


def flux():
    model = models.FluxBackbone(
        input_channels=8,
        hidden_size=16,
        mlp_ratio=2.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[2, 2, 4],
        theta=10000,
        use_bias=True,
        guidance_embed=False,
        image_shape=(4, 8),
        text_shape=(4, 8),
        image_ids_shape=(4, 3),
        text_ids_shape=(4, 3),
        y_shape=(8,),
    )
    rng = np.random.default_rng(0)
    inputs = {
        "image": rng.normal(size=(2, 4, 8)).astype("float32"),
        "image_ids": np.zeros((2, 4, 3), "float32"),
        "text": rng.normal(size=(2, 4, 8)).astype("float32"),
        "text_ids": np.zeros((2, 4, 3), "float32"),
        "y": rng.normal(size=(2, 8)).astype("float32"),
        "timesteps": np.full((2,), 0.5, "float32"),
        "guidance": np.full((2,), 1.0, "float32"),
    }
    return model, inputs


FAMILIES = {
    "vit": vit,
    "deit": deit,
    "dinov2": dinov2,
    "dinov3": dinov3,
    "siglip": siglip,
    "clip": clip,
    "sam": sam,
    "deeplabv3": deeplabv3,
    "swin": swin,
    "resnet": resnet,
    "efficientnet": efficientnet,
    "mobilenet": mobilenet,
    "paligemma": paligemma,
    "gemma3_vision": gemma3_vision,
    "whisper": whisper,
    "moonshine": moonshine,
    "t5": t5,
    "t5gemma": t5gemma,
    "bart": bart,
    "smollm3": smollm3,
    "rwkv7": rwkv7,
    "flux": flux,
}

CNNS = ("deeplabv3", "resnet", "efficientnet", "mobilenet")
# "all-linear" selects nothing on these: the layer producing the backbone's
# output holds every block (ViT, DeiT) or is the last block (BART, 1 layer).
ALL_LINEAR_EMPTY = ("vit", "deit", "bart")
TARGETS = {
    name: conv_layers
    if name in CNNS
    else linear_layers
    if name in ALL_LINEAR_EMPTY
    else "all-linear"
    for name in FAMILIES
}


def build(name, seed=0):
    """The tiny backbone of family `name` and its inputs, weights from `seed`."""
    keras.utils.set_random_seed(seed)
    return FAMILIES[name]()
