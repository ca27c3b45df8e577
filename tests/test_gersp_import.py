"""`import-weights --format gersp-resnet50` on a raw mmcv GeRSP checkpoint (docs/gersp.md)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from geocmid.models.weights import import_weights


def test_raw_gersp_checkpoint_gives_the_query_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = timm.create_model('resnet50', num_classes=0).state_dict()
    # The raw epoch_100.pth: the query encoder under backbone.* and again under encoder_q.*,
    # the key encoder, both projectors (neck.* = proj_q.*) and the 1000-class head besides.
    state = {f'backbone.{key}': value for key, value in student.items()}
    state |= {f'encoder_q.{key}': value for key, value in student.items()}
    state |= {f'encoder_k.{key}': torch.zeros(1) for key in student}
    for prefix in ('neck', 'proj_q', 'proj_k'):
        state[f'{prefix}.mlp.0.weight'] = torch.ones(8, 2048)
        state[f'{prefix}.mlp.2.bias'] = torch.ones(128)
    state |= {'pred_q.weight': torch.ones(1000, 1), 'pred_q.bias': torch.ones(1000)}
    state['queue'] = torch.ones(128, 4)
    checkpoint = {
        'meta': {'epoch': 100, 'iter': 500000, 'mmselfsup_version': '0.8.0', 'hook_msgs': {}},
        'state_dict': state,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.001, 'momentum': 0.9}]},
    }
    path = tmp_path / 'epoch_100.pth'
    torch.save(checkpoint, path)

    encoder, card = import_weights(path, 'gersp-resnet50', tmp_path / 'encoder.pt')
    assert card.method == 'gersp' and card.backbone == 'resnet50' and card.in_chans == 3
    model = timm.create_model('resnet50', num_classes=0)
    model.load_state_dict(torch.load(encoder, weights_only=True), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, student[key]), key
