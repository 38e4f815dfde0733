import torch

import weightcond as wc

torch.manual_seed(0)
layer = torch.nn.Linear(768, 768)
layer.requires_grad_(False)                        # the pretrained weight stays frozen
upd = wc.register_update(layer, rank=16, alpha=32)  # ΔW = (alpha/rank)·B A, B = 0
cal = wc.register_conditioning(layer, placement="pre", side="left", transform="diag")
rot = wc.register_conditioning(layer, placement="post", side="left", transform="skew",
                               rank=4, map="cayley")
x = torch.randn(8, 20, 768)
target = torch.randn(8, 20, 768)

opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
for step in range(5):
    loss = torch.nn.functional.mse_loss(layer(x), target)  # matrix-free forward
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")

W = layer.weight                                   # the dense conditioned weight
y = layer(x)
dense = torch.nn.functional.linear(x, W, layer.bias)
print("matrix-free vs dense:", (y - dense).abs().max().item())
Q = rot.transform.matrix()
print("rotation orthogonality error:", (Q.T @ Q - torch.eye(768)).abs().max().item())
print("conditioners:", [(c.placement, c.side, c.transform.name) for c in wc.conditioners(layer)])

wc.merge(layer)                                    # now a plain nn.Linear
print(type(layer).__name__, "merged; max difference:", (layer(x) - y).abs().max().item())
