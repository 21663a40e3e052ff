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

import inspect

import keras
import keras_hub
import numpy as np
import tiny_kerashub
from conftest import to_numpy

import keras_lora as kl
from keras_lora.model.walk import iter_layers, lora_layers

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


def _image_text(prefix, backbone_class):
    """A tiny CLIP-like backbone: `<prefix>VisionEncoder` and
    `<prefix>TextEncoder` of the same sizes under `backbone_class`."""
    vision = getattr(models, f"{prefix}VisionEncoder")(
        patch_size=8,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(16, 16, 3),
    )
    text = getattr(models, f"{prefix}TextEncoder")(
        vocabulary_size=64,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    model = getattr(models, backbone_class)(vision, text, projection_dim=16)
    return model, {"images": _images(16), "token_ids": _tokens()}


def clip():
    return _image_text("CLIP", "CLIPBackbone")


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


# More families, built from one table of tiny arguments ---------------------

# The constructor arguments every tiny transformer here takes (each class
# takes those of its signature): one block, hidden size 16.
TINY = {
    "vocabulary_size": 64,
    "vocab_size": 64,
    "num_layers": 1,
    "num_heads": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 16,
    "embedding_dim": 16,
    "intermediate_dim": 32,
    "head_dim": 8,
    "head_size": 8,
    "max_sequence_length": 32,
    "num_layers_enc": 1,
    "num_layers_dec": 1,
}


def tiny(class_name, **arguments):
    """A tiny `keras_hub.models.<class_name>`: the `TINY` arguments its
    constructor takes, then `arguments`."""
    cls = getattr(models, class_name)
    names = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in TINY.items() if k in names}, **arguments)


def inputs_for(model, batch=2, seq=8, vocab=64, seed=0):
    """NumPy inputs matching `model.input`: token ids in [1, vocab), masks
    of ones (the last token of the second row padded), segment ids of
    zeros, floats uniform in [0, 1); unknown sizes are `seq`."""
    rng = np.random.default_rng(seed)
    specs = model.input if isinstance(model.input, dict) else {"x": model.input}
    inputs = {}
    for name, spec in specs.items():
        shape = (batch,) + tuple(seq if d is None else d for d in spec.shape[1:])
        if "float" in str(spec.dtype):
            inputs[name] = rng.uniform(size=shape).astype("float32")
        elif "mask" in name:
            inputs[name] = (
                _mask(batch, shape[1]) if len(shape) == 2 else np.ones(shape, "int32")
            )
        elif "segment" in name:
            inputs[name] = np.zeros(shape, "int32")
        else:
            inputs[name] = rng.integers(1, vocab, size=shape).astype("int32")
    return inputs if isinstance(model.input, dict) else inputs["x"]


def _from_table(class_name, **arguments):
    def build():
        model = tiny(class_name, **arguments)
        return model, inputs_for(model)

    build.__name__ = class_name
    return build


def _text(name):
    """One of the 14 text backbones of `tiny_kerashub`."""

    def build():
        model = tiny_kerashub.backbone(name)
        return model, tiny_kerashub.backbone_inputs(model)

    return build


MORE_TEXT = {
    "albert": _from_table("AlbertBackbone"),
    "bloom": _from_table("BloomBackbone"),
    "deberta_v3": _from_table("DebertaV3Backbone"),
    "electra": _from_table("ElectraBackbone"),
    "esm": _from_table("ESMBackbone"),
    "edrec": _from_table("EdRecBackbone"),
    "fnet": _from_table("FNetBackbone"),
    "gpt_neox": _from_table("GPTNeoXBackbone"),
    "qwen3_5": _from_table("Qwen3_5Backbone"),
    "roformer_v2": _from_table("RoformerV2Backbone"),
    "xlm_roberta": _from_table("XLMRobertaBackbone"),
    "xlnet": _from_table("XLNetBackbone"),
}

MORE_VISION = {
    "vgg": _from_table(
        "VGGBackbone",
        stackwise_num_repeats=[1, 1],
        stackwise_num_filters=[4, 8],
        image_shape=(16, 16, 3),
    ),
    "densenet": _from_table(
        "DenseNetBackbone",
        stackwise_num_repeats=[1, 1],
        growth_rate=4,
        image_shape=(32, 32, 3),
    ),
    "xception": _from_table(
        "XceptionBackbone",
        stackwise_conv_filters=[[8, 8], [16, 16]],
        stackwise_pooling=[True, False],
        image_shape=(32, 32, 3),
    ),
    "cspnet": _from_table(
        "CSPNetBackbone",
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=2,
        stackwise_depth=[1, 1],
        stackwise_strides=[2, 2],
        stackwise_num_filters=[8, 16],
        block_type="bottleneck_block",
        stage_type="csp",
        expand_ratio=[2.0],  # CSPDarkNet's: the default 1.0 can't add
        image_shape=(32, 32, 3),
    ),
    "hgnetv2": _from_table(
        "HGNetV2Backbone",
        depths=[1, 1],
        embedding_size=8,
        hidden_sizes=[16, 32],
        stem_channels=[3, 8, 8],
        hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[[8, 8, 16, 1, 1, 3], [16, 8, 32, 1, 1, 3]],
        apply_downsample=[False, True],
        use_lightweight_conv_block=[False, False],
        image_shape=(32, 32, 3),
    ),
    "vitdet": _from_table(
        "ViTDetBackbone",
        hidden_size=16,
        global_attention_layer_indices=[0],
        image_shape=(32, 32, 3),
        patch_size=8,
        window_size=2,
    ),
}


def _mit():
    return models.MiTBackbone(
        layerwise_depths=[1, 1],
        num_layers=2,
        layerwise_num_heads=[1, 1],
        layerwise_sr_ratios=[2, 1],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        hidden_dims=[8, 16],
        image_shape=(32, 32, 3),
    )


def mit():
    return _mit(), _images(32)


def segformer():
    model = models.SegFormerBackbone(image_encoder=_mit(), projection_filters=8)
    return model, _images(32)


def blip2():
    from keras_hub.src.models.blip2.blip2_custom_opt import BLIP2CustomOPT
    from keras_hub.src.models.blip2.blip2_qformer import BLIP2QFormer
    from keras_hub.src.models.blip2.blip2_vision_encoder import BLIP2VisionEncoder

    common = {"num_heads": 2, "hidden_dim": 16, "intermediate_dim": 32}
    vision = BLIP2VisionEncoder(
        image_size=16,
        patch_size=8,
        num_layers=1,
        use_patch_bias=True,
        use_class_token=True,
        use_mha_bias=True,
        use_mlp_bias=True,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        **common,
    )
    qformer = BLIP2QFormer(
        num_query_tokens=4,
        num_layers=1,
        vision_dim=16,
        cross_attention_frequency=1,
        dropout=0.0,
        layer_norm_epsilon=1e-5,
        **common,
    )
    language = BLIP2CustomOPT(
        vocabulary_size=64,
        num_layers=1,
        num_query_tokens=4,
        dropout=0.0,
        max_sequence_length=32,
        qformer_hidden_dim=16,
        **common,
    )
    model = models.BLIP2Backbone(
        vision_encoder=vision, qformer=qformer, language_model=language
    )
    return model, inputs_for(model)


def gemma4():
    model = tiny("Gemma4Backbone", image_size=16)
    inputs = {
        "token_ids": _tokens(),
        "padding_mask": np.ones((2, 8), "int32"),
        "position_ids": np.broadcast_to(np.arange(8), (2, 8)).astype("int32"),
    }
    return model, inputs


def t5gemma2():
    sides = {
        f"{side}_{key}": value
        for side in ("encoder", "decoder")
        for key, value in {
            "hidden_dim": 16,
            "intermediate_dim": 32,
            "num_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "layer_types": ["full_attention"],
        }.items()
    }
    model = models.T5Gemma2Backbone(vocabulary_size=64, **sides)
    return model, inputs_for(model)


def videoprism():
    model = models.VideoPrismBackbone(
        num_frames=2,
        patch_size=8,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        num_spatial_layers=1,
        num_temporal_layers=1,
        num_auxiliary_layers=0,
        image_shape=(16, 16, 3),
    )
    return model, inputs_for(model)


def retinanet():
    encoder = models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2],
        block_type="basic_block",
        image_shape=(32, 32, 3),
    )
    model = models.RetinaNetBackbone(
        image_encoder=encoder,
        min_level=3,
        max_level=4,
        use_p5=False,
        image_shape=(32, 32, 3),
    )
    return model, _images(32)


def metaclip2():
    return _image_text("MetaCLIP2", "MetaCLIP2Backbone")


def sd3():
    """StableDiffusion3: the MMDiT with a tiny VAE and CLIP-L/CLIP-G text
    encoders. The VAE takes its distribution's mode: its default draws a
    sample, and outputs equal at init need the same numbers twice."""
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    vae = VAEBackbone(
        encoder_num_filters=[32, 32],  # GroupNormalization's 32 groups
        encoder_num_blocks=[1, 1],
        decoder_num_filters=[32, 32],
        decoder_num_blocks=[1, 1],
        sample_channels=8,  # mean and log-variance of 4 latent channels
        sampler_method="mode",
    )

    def clip(name, width):
        return models.CLIPTextEncoder(
            vocabulary_size=64,
            embedding_dim=width,
            hidden_dim=width,
            num_layers=1,
            num_heads=2,
            intermediate_dim=2 * width,
            intermediate_output_index=0,
            max_sequence_length=8,
            name=name,
        )

    model = models.StableDiffusion3Backbone(
        mmdit_patch_size=2,
        mmdit_hidden_dim=16,
        mmdit_num_layers=1,
        mmdit_num_heads=2,
        mmdit_position_size=8,
        mmdit_qk_norm=None,
        mmdit_dual_attention_indices=None,
        vae=vae,
        clip_l=clip("clip_l", 8),
        clip_g=clip("clip_g", 16),
        latent_channels=4,
        image_shape=(16, 16, 3),
    )
    return model, inputs_for(model)


def basnet():
    """BASNet needs a ResNet of 64 filters (its refinement head's width)
    and images of 32 pixels or more."""
    encoder = models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64, 64, 64],
        stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block",
    )
    model = models.BASNetBackbone(
        image_encoder=encoder,
        num_classes=1,
        image_shape=(32, 32, 3),
        projection_filters=64,
    )
    return model, _images(32, batch=1)


def depth_anything():
    encoder = models.DINOV2Backbone(
        patch_size=2,
        num_layers=3,  # one per reassembled feature but the last
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(32, 32, 3),
        position_embedding_shape=(16, 16),
    )
    model = models.DepthAnythingBackbone(
        image_encoder=encoder,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_dims=[8, 8, 8, 8],
        fusion_hidden_dim=8,
        head_hidden_dim=8,
        head_in_index=-1,
    )
    return model, _images(32)


def parseq():
    encoder = models.ViTBackbone(
        image_shape=(16, 32, 3),
        patch_size=(8, 8),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        use_class_token=False,
    )
    model = models.PARSeqBackbone(
        image_encoder=encoder,
        vocabulary_size=16,
        max_label_length=4,
        decoder_hidden_dim=16,
        num_decoder_layers=1,
        num_decoder_heads=2,
        decoder_mlp_dim=32,
    )
    return model, inputs_for(model, vocab=16, seq=5)


# Mixture of experts: 4 experts, top 2.
MOE = {
    "mixtral": _from_table("MixtralBackbone", num_experts=4, top_k=2),
    "qwen_moe": _from_table(
        "QwenMoeBackbone",
        moe_intermediate_dim=24,
        shared_expert_intermediate_dim=32,
        num_experts=4,
        top_k=2,
    ),
    "qwen3_moe": _from_table(
        "Qwen3MoeBackbone", moe_intermediate_dim=24, num_experts=4, top_k=2
    ),
    "qwen3_5_moe": _from_table(
        "Qwen3_5MoeBackbone",
        moe_intermediate_dim=24,
        shared_expert_intermediate_size=32,
        num_experts=4,
        top_k=2,
        layer_types=["full_attention"],
    ),
    "gpt_oss": _from_table("GptOssBackbone", num_experts=4, top_k=2),
}


def moe_layers(layer):
    """A MoE family's default targets: the experts (`LoRAMoeExperts`) and
    every Dense/EinsumDense but the router, which stays frozen (PEFT's
    `target_parameters` recipes leave it out too)."""
    from keras_lora.layers.moe_experts import MoeExperts

    if isinstance(layer, MoeExperts):
        return True
    return linear_layers(layer) and "router" not in layer.name and "gate" != layer.name


FAMILIES = {
    # vision
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
    "mit": mit,
    "segformer": segformer,
    "retinanet": retinanet,
    "basnet": basnet,
    "depth_anything": depth_anything,
    "parseq": parseq,
    "videoprism": videoprism,
    **MORE_VISION,
    # multimodal
    "paligemma": paligemma,
    "gemma3_vision": gemma3_vision,
    "blip2": blip2,
    "gemma4": gemma4,
    "metaclip2": metaclip2,
    # audio
    "whisper": whisper,
    "moonshine": moonshine,
    # text
    **{name: _text(name) for name in tiny_kerashub.BACKBONES},
    "t5": t5,
    "t5gemma": t5gemma,
    "t5gemma2": t5gemma2,
    "bart": bart,
    "smollm3": smollm3,
    "rwkv7": rwkv7,
    **MORE_TEXT,
    **MOE,
    # diffusion
    "flux": flux,
    "sd3": sd3,
}

CNNS = (
    "deeplabv3",
    "resnet",
    "efficientnet",
    "mobilenet",
    "vgg",
    "densenet",
    "xception",
    "cspnet",
    "hgnetv2",
    "retinanet",
    "basnet",
)
# The layer producing the output holds every block (ViT, DeiT) or is the
# last block (BART, one layer): "all-linear" must still select the blocks'
# layers, as it leaves out only output layers (docs/families.md).
OUTPUT_HOLDS_BLOCKS = ("vit", "deit", "bart")
TARGETS = {
    name: conv_layers if name in CNNS else moe_layers if name in MOE else "all-linear"
    for name in FAMILIES
}


def build(name, seed=0):
    """The tiny backbone of family `name` and its inputs, weights from `seed`."""
    keras.utils.set_random_seed(seed)
    return FAMILIES[name]()


def outputs(model, x):
    return [to_numpy(t) for t in keras.tree.flatten(model(x, training=False))]


def max_diff(a, b):
    return max(
        float(np.abs(u.astype("float64") - v).max(initial=0.0))
        for u, v in zip(a, b, strict=True)
    )


def check(name):
    """Runs the family checks of `tests/model/test_kerashub_families.py` on
    family `name` (assertions); returns the backbone's class name, the
    number of LoRA layers and `enable_lora_reach` of the same backbone."""
    model, x = build(name)
    cls = type(model)
    before = outputs(model, x)

    # Class kept, outputs equal at init.
    result = kl.apply_lora(model, targets=TARGETS[name], rank=2, in_place=True)
    assert result is model and type(model) is cls
    adapted = lora_layers(model)
    assert adapted
    for old, new in zip(before, outputs(model, x), strict=True):
        np.testing.assert_array_equal(old, new)  # B = 0: exactly the same

    # One training step moves the adapters and nothing else.
    weights = {id(w): to_numpy(w).copy() for w in model.weights}
    # JAX: one jitted step, as `fit` runs it (eagerly, JAX compiles every op
    # of the backward apart: 3 to 6 times slower on tiny backbones).
    # TensorFlow: eagerly (tracing a graph, with or without XLA, costs more
    # than one eager step). torch runs it eagerly either way.
    eager = keras.backend.backend() != "jax"
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", run_eagerly=eager)
    y = keras.tree.map_structure(
        lambda t: np.ones(t.shape, "float32"), model(x, training=False)
    )
    model.train_on_batch(x, y)
    changed = [
        w.path for w in model.weights if not np.array_equal(to_numpy(w), weights[id(w)])
    ]
    assert changed
    assert all(p.split("/")[-1] in ("lora_a", "lora_b") for p in changed), changed

    # Merge exactly, keeping the class.
    rng = np.random.default_rng(1)
    for _, layer in adapted:
        b = layer.lora_b
        b.assign(0.1 * rng.normal(size=b.shape).astype(b.dtype))
    lora_out = outputs(model, x)
    # The adapters matter: they move the outputs by more than 1e-3 of their
    # size (tiny random backbones: MobileNet's features are ~1e-4).
    size = max(float(np.abs(t.astype("float64")).max(initial=0.0)) for t in lora_out)
    assert max_diff(lora_out, before) > 1e-3 * size
    merged = kl.merge_lora(model)
    assert type(merged) is cls
    assert not any(
        type(layer).__module__.startswith("keras_lora")
        for _, layer in iter_layers(merged)
    )
    # Float32 (eps 1.2e-7): a merged kernel sums W x + B A x in another
    # order, a few ulps per layer over a few layers, so 1e-5 of the output's
    # size; a lost adapter moves it by more than 1e-3 of it (checked above).
    assert max_diff(outputs(merged, x), lora_out) <= 1e-5 * size
    # KerasHub's own `enable_lora` on the same (now plain) backbone.
    return {
        "class": cls.__name__,
        "lora_layers": len(adapted),
        "enable_lora": enable_lora_reach(merged),
    }


def enable_lora_reach(backbone, rank=2):
    """How many layers KerasHub's own `backbone.enable_lora(rank)` adapts
    (its default `default_lora_layer_names()`), or its error."""
    try:
        backbone.enable_lora(rank)
    except Exception as error:  # KerasHub's own failure is the finding
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    layers = iter_layers(backbone)
    return sum(bool(getattr(layer, "lora_enabled", False)) for _, layer in layers)
