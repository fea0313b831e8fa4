"""The three attention masks of stage 1 (BLIP-2 paper, Fig. 2; LAVIS `get_extended_attention_mask`).

All masks are boolean [B, 1, rows, cols], True where a position (row) may attend to a key (col).

| objective | queries see      | text sees                              |
| ITC       | queries only     | text only (separate text-only pass)    |
| ITM       | queries + text   | queries + text                         |
| ITG       | queries only     | all queries + earlier text (causal)    |
"""

import jax.numpy as jnp


def padding_mask(text_mask):
  """Text-only (ITC text pass): every token sees the non-pad text tokens. text_mask: [B, T] 0/1."""
  return text_mask[:, None, None, :].astype(bool)


def bidirectional_mask(num_queries: int, text_mask):
  """ITM: queries and text see all queries and all non-pad text. -> [B, 1, 1, Q + T]."""
  b = text_mask.shape[0]
  keys = jnp.concatenate([jnp.ones((b, num_queries), bool), text_mask.astype(bool)], axis=1)
  return keys[:, None, None, :]


def multimodal_causal_mask(num_queries: int, text_mask):
  """ITG, full square form [B, 1, Q + T, Q + T]: queries see queries only; text sees all queries and the
  non-pad text at or before its own position."""
  b, t = text_mask.shape
  q = num_queries
  causal = jnp.tril(jnp.ones((t, t), bool))[None] & text_mask.astype(bool)[:, None, :]
  query_rows = jnp.concatenate([jnp.ones((b, q, q), bool), jnp.zeros((b, q, t), bool)], axis=2)
  text_rows = jnp.concatenate([jnp.ones((b, t, q), bool), causal], axis=2)
  return jnp.concatenate([query_rows, text_rows], axis=1)[:, None]


def text_rows_of_multimodal_causal_mask(num_queries: int, text_mask):
  """The text rows of `multimodal_causal_mask`: what ITG's text pass uses over [cached queries; text] keys.

  The query rows need no pass of their own: queries see only queries, so their states are exactly those of the
  ITC query pass, whose keys/values are reused (as LAVIS does with past_key_values)."""
  return multimodal_causal_mask(num_queries, text_mask)[:, :, num_queries:]
