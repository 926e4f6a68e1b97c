"""fp64 references for every op, written with torch's own functions and kept
apart from fastdl's code (the 'torch' backend is tested against these too)."""
import torch
import torch.nn.functional as F


def act(x: torch.Tensor, name: str, negative_slope: float = 0.01) -> torch.Tensor:
    return {
        "gelu": lambda: F.gelu(x),
        "gelu_tanh": lambda: F.gelu(x, approximate="tanh"),
        "relu": lambda: F.relu(x),
        "leaky_relu": lambda: F.leaky_relu(x, negative_slope),
        "silu": lambda: F.silu(x),
        "sigmoid": lambda: torch.sigmoid(x),
        "tanh": lambda: torch.tanh(x),
    }[name]()


def bias_act(x, bias, name, negative_slope=0.01):
    """act(x + bias) in fp64."""
    x = x.double()
    if bias is not None:
        x = x + bias.double()
    return act(x, name, negative_slope)


def gated(x, name, negative_slope=0.01):
    """act(a) * b, a, b = x.chunk(2, -1), in fp64."""
    a, b = x.double().chunk(2, dim=-1)
    return act(a, name, negative_slope) * b


def norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, rms=False):
    """LayerNorm (rms=False) or RMSNorm over normalized_shape, in fp64."""
    w = weight.double() if weight is not None else None
    if rms:
        return F.rms_norm(x.double(), normalized_shape, w, eps)
    return F.layer_norm(x.double(), normalized_shape, w, bias.double() if bias is not None else None, eps)


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum=0.1, eps=1e-5,
               act_name=None, residual=None, negative_slope=0.01):
    """act(F.batch_norm(x) + residual) in fp64. running_mean/var (fp64 or None)
    are updated in place as torch does."""
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    y = F.batch_norm(x.double(), running_mean, running_var, f64(weight), f64(bias), training, momentum, eps)
    if residual is not None:
        y = y + residual.double()
    return act(y, act_name, negative_slope) if act_name else y


def attention(q, k, v, attn_mask=None, causal="none", scale=None, keep=None, dropout_p=0.0,
              dtype=torch.float64):
    """(out, lse) of softmax(scale q k^T + mask) v on (B, Hq, Nq, D) / (B, Hkv, Nk, D),
    computed in `dtype`: float64 for the reference, the inputs' own dtype for
    PyTorch's own low-precision error. k/v heads repeat for GQA. causal:
    "top_left" hides keys j > i, "bottom_right" keys j > i + Nk - Nq.
    attn_mask: bool (True = attend) or additive. keep: dropout keep mask,
    kept probabilities scaled by 1 / (1 - dropout_p). A row that sees no key
    gives 0 and lse -inf."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    nq, nk = s.shape[-2:]
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(dtype)
    if causal != "none":
        shift = nk - nq if causal == "bottom_right" else 0
        hidden = torch.arange(nk, device=s.device)[None, :] > torch.arange(nq, device=s.device)[:, None] + shift
        s = s.masked_fill(hidden, float("-inf"))
    seen = (s > float("-inf")).any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~seen, 0.0), dim=-1) * seen
    lse = torch.logsumexp(s, dim=-1)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return torch.matmul(p, v), lse


def varlen_attention(q, k, v, cu_q, cu_k, causal="none", scale=None, dtype=torch.float64):
    """Packed (T, H, D) attention, sequence by sequence through `attention`."""
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]))
        outs.append(attention(qs, ks, vs, None, causal, scale, dtype=dtype)[0][0].transpose(0, 1))
    return torch.cat(outs)


def grad_norm(grads):
    """Global L2 norm of a list of tensors, in fp64."""
    return torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))


def conv_bn_act(x, w, b, gamma, beta, running_mean, running_var, stride=1, padding=0, dilation=1, groups=1,
                training=False, momentum=0.1, eps=1e-5, act_name="relu", residual=None, negative_slope=0.01):
    """act(batch_norm(conv2d(x)) + residual) in fp64. The running statistics
    are updated in place as F.batch_norm does, so pass fp64 copies."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = F.conv2d(d(x), d(w), d(b), stride, padding, dilation, groups)
    z = F.batch_norm(y, running_mean, running_var, d(gamma), d(beta), training, momentum, eps)
    if residual is not None:
        z = z + d(residual)
    return z if act_name in (None, "none") else act(z, act_name, negative_slope)
