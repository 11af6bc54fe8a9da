"""Hybrid decoder-only language models: `HybridModel`, `HybridForCausalLM`, `HybridForSequenceClassification`.

Each layer is pre-norm -> mixer (any registered block) -> residual -> pre-norm -> gated MLP -> residual. The model
knows two kinds of mixer: attention blocks (KV cache, causal mask, RoPE) and recurrent blocks (a fixed-size state
passed in and out). Padding and document boundaries enter once, here, as a `[B, T]` padding mask and a `[B, T]` reset
mask (a real token at `position_ids == 0` starts a new document), and every recurrent block honours both.
"""

import torch
from torch import nn
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .block_attention import HybridAttention
from .blocks import BLOCK_CLASSES
from .cache_hybrid import CACHE_NAME, HybridCache, accepts_past_key_values
from .configuration_hybrid import HybridConfig
from .layers import HybridMLP, HybridRMSNorm, HybridRotaryEmbedding
from .ops_cross_entropy import chunked_linear_cross_entropy, shift_labels_for_causal_lm


def layer_norm(config: HybridConfig, bias: bool = False) -> HybridRMSNorm:
    """A hidden-size RMSNorm in the form the config asks for (Llama's, or zero-centred `1 + w`)."""
    return HybridRMSNorm(config.hidden_size, config.rms_norm_eps, config.rms_norm_zero_centered, bias)


class HybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.block_type = config.block_types[layer_idx]
        self.input_layernorm = layer_norm(config, bias=config.rms_norm_bias)
        self.mixer = BLOCK_CLASSES[self.block_type](config, layer_idx)
        if config.intermediate_size > 0:
            self.post_mixer_layernorm = layer_norm(config, bias=config.rms_norm_bias)
            self.mlp = HybridMLP(config)
        else:
            self.mlp = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: HybridCache | None = None,
        padding_mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.mixer.is_recurrent:
            state = cache.get_block_state(self.layer_idx) if cache is not None else None
            hidden_states, state = self.mixer(hidden_states, state, mask=padding_mask, reset=reset)
            if cache is not None:
                cache.set_block_state(self.layer_idx, state)
        else:
            hidden_states, _ = self.mixer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
        hidden_states = residual + hidden_states
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_mixer_layernorm(hidden_states))
        return hidden_states


class HybridPreTrainedModel(PreTrainedModel):
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _is_stateful = True  # recurrent state cannot be rolled back: generate() refuses assisted decoding
    _can_record_outputs = {
        "hidden_states": HybridDecoderLayer,
        "attentions": OutputRecorder(HybridAttention, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if hasattr(module, "init_custom_parameters"):
            module.init_custom_parameters()

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers skips custom-code modules without parameters of their own; a block whose own init writes its
        # children's parameters (the LSTM's forget bias, the mLSTM gate biases) must not be skipped
        super()._initialize_weights(module, is_custom_code and not hasattr(module, "init_custom_parameters"))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model creates its own HybridCache on the first forward
        return False


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [HybridDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = layer_norm(config)
        self.has_attention = any(not layer.mixer.is_recurrent for layer in self.layers)
        self.rotary_emb = HybridRotaryEmbedding(config) if self.has_attention else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @accepts_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.config.embedding_scale != 1.0:  # Gemma-family: the scale rounded to the activations' dtype first
            inputs_embeds = inputs_embeds * torch.tensor(self.config.embedding_scale, dtype=inputs_embeds.dtype)
        if use_cache and cache is None:
            cache = HybridCache(self.config)
        if cache is not None and not hasattr(cache, "get_block_state"):
            raise TypeError(
                f"`{CACHE_NAME}` must be a hybridzoo `HybridCache` (got {type(cache).__name__}): recurrent layers keep "
                "a fixed-size state a plain DynamicCache cannot hold. Pass `use_cache=True` and reuse the returned "
                f"`{CACHE_NAME}`, or build one with `HybridCache(model.config)`."
            )
        batch, length = inputs_embeds.shape[:2]
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        padding_mask, reset = self._recurrent_masks(attention_mask, position_ids, batch, length, past_seen_tokens)
        if position_ids is None:
            position_ids = torch.arange(length, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        layer_masks = {}
        if isinstance(attention_mask, dict):  # already prepared per layer type (static-cache generation)
            layer_masks = attention_mask
        elif self.has_attention:
            # transformers masks packed documents (position_ids restarting at 0) only when no cache is passed; a cache
            # that holds nothing yet sizes the mask like no cache, so leave it out then and attention stays within each
            # document, as the recurrent blocks do (a compileable cache keeps its fixed-size mask)
            fresh_packed = reset is not None and past_seen_tokens == 0 and attention_mask is None
            mask_cache = None if fresh_packed and not getattr(cache, "is_compileable", False) else cache
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_NAME: mask_cache,
                "position_ids": position_ids,
            }
            # `layer_idx` names the cache layer to size each mask by (left to transformers, an older release can pick a
            # recurrent layer)
            layer_types = self.config.layer_types
            if "full_attention" in layer_types:
                layer_idx = layer_types.index("full_attention")
                layer_masks["full_attention"] = create_causal_mask(**mask_kwargs, layer_idx=layer_idx)
            if "sliding_attention" in layer_types:
                layer_idx = layer_types.index("sliding_attention")
                layer_masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs, layer_idx=layer_idx)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.has_attention else None
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=layer_masks.get(decoder_layer.mixer.layer_type),
                position_embeddings=position_embeddings,
                cache=cache,
                padding_mask=padding_mask,
                reset=reset,
                **kwargs,
            )
        if cache is not None:
            cache.seen_tokens += length
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache})

    @staticmethod
    def _recurrent_masks(
        attention_mask: torch.Tensor | dict | None,
        position_ids: torch.Tensor | None,
        batch: int,
        length: int,
        past_seen_tokens: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`[B, T]` padding mask (None: no padding) and document-start mask (None: no reset) for recurrent blocks."""
        padding_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            current = attention_mask[:, -length:].bool()
            if not bool(current.all()):
                padding_mask = current
        reset = None
        if position_ids is not None and position_ids.ndim == 2:
            starts = (position_ids == 0).expand(batch, length)
            if padding_mask is not None:
                starts = starts & padding_mask
            if past_seen_tokens == 0:
                # a document start before which this row has seen nothing is already a fresh state
                real = padding_mask if padding_mask is not None else torch.ones_like(starts)
                starts = starts & ((real.long().cumsum(dim=1) - real.long()) > 0)
            if bool(starts.any()):
                reset = starts
        return padding_mask, reset


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        skip_logits (`bool`, *optional*):
            With `labels`, compute the loss by the chunked LM head + cross-entropy and return `logits=None` (the
            full logits are never built). Default: when training (`model.train()`) with `labels`.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        loss = logits = None
        if labels is not None and skip_logits and self._chunked_loss_applies(logits_to_keep):
            loss = self._chunked_causal_lm_loss(hidden_states, labels, **kwargs)
        else:
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])
            if self.config.final_logit_softcapping is not None:
                cap = self.config.final_logit_softcapping
                logits = torch.tanh(logits / cap) * cap
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _chunked_loss_applies(self, logits_to_keep: int | torch.Tensor) -> bool:
        """The chunked loss replaces exactly `ForCausalLMLoss(lm_head(h), labels)`: a plain, unwrapped `nn.Linear` head
        (not a PEFT / hook-wrapped one), no logit soft-capping, all positions kept, and transformers' default
        causal-LM loss."""
        head = self.lm_head
        return (
            self.config.final_logit_softcapping is None
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
            and type(head) is nn.Linear
            and not (head._forward_hooks or head._forward_pre_hooks)
            and not hasattr(self, "_loss_function")
            and getattr(self, "loss_type", None) in (None, "ForCausalLM")
        )

    def _chunked_causal_lm_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`ForCausalLMLoss(lm_head(hidden_states), labels, ...)` by `chunked_linear_cross_entropy` (same arguments)."""
        if shift_labels is None:
            shift_labels = shift_labels_for_causal_lm(labels, ignore_index)
        return chunked_linear_cross_entropy(
            hidden_states,
            self.lm_head.weight,
            shift_labels.to(hidden_states.device),
            bias=self.lm_head.bias,
            ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch,
        )


class HybridForSequenceClassification(GenericForSequenceClassification, HybridPreTrainedModel):
    """Classifies a sequence from the hidden state of its last non-padding token (transformers' generic head)."""

    def __init__(self, config: HybridConfig) -> None:
        # the generic head builds its body with `AutoModel.from_config`, which a remote-code load cannot resolve
        HybridPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = HybridModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


# `save_pretrained` copies this folder's code next to the weights and writes an `auto_map`, so that
# `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where hybridzoo is not installed.
HybridConfig.register_for_auto_class()
HybridModel.register_for_auto_class("AutoModel")
HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")
HybridForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = ["HybridPreTrainedModel", "HybridModel", "HybridForCausalLM", "HybridForSequenceClassification"]
