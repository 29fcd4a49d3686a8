"""Every building block of ScratchLM written out by hand, tested equal to the fast path (for learning).

The model trains with torch's fused kernels (:mod:`scratchlm.model.functional`); this package spells the
same math out in plain tensor operations, with the formula and shapes in each docstring, in the order a
course teaches them:

=====================  ========================================================================
functional             linear, embedding, softmax, log_softmax, relu, silu, gelu, gelu_tanh,
                       rms_norm, layer_norm, rope / rotate / apply_rope (half and interleaved),
                       causal_mask, scaled_dot_product_attention (causal, boolean mask, GQA), swiglu,
                       dropout, cross_entropy (ignore_index, label smoothing)
layers                 Linear, Embedding, RMSNorm, LayerNorm, RotaryPositionalEmbedding,
                       sinusoidal_positions, FeedForward (SwiGLU, GELU, ReLU), MultiHeadSelfAttention
                       (causal, RoPE, GQA, padding), CrossAttention
transformer            TransformerBlock (pre/post-norm; GPT-2 and Llama flavours), TransformerLM,
                       DecoderBlock, EncoderDecoderTransformer: the fast models' parameter names
bpe                    byte-level BPE training, and Tokenizer.encode / decode
data, checkpoint       get_batch; save_checkpoint / load_checkpoint (tensors only, weights_only=True)
optim                  AdamW, Muon (newton_schulz), clip_grad_norm, warmup / cosine / wsd / constant
cs336                  the CS336 assignment's config and weight names <-> ScratchLM's
lora                   LoRA: h = W x + b + (alpha / r) B A dropout(x), and its merge (tested equal to peft)
modules                use_reference(model): the same model (same weights) computed by the above
=====================  ========================================================================

Train through them with ``model.impl=reference`` and ``train.optimizer=adamw_reference`` (or
``muon_reference``): slower, and the same loss curve within float rounding. Swap in your own version of
any function and compare: tests/reference shows how each one is checked against torch.
"""

from scratchlm.reference.modules import use_reference

__all__ = ["use_reference"]
