"""A VLA trained as a VLM (one trainable encoder, the source's projector) saved back as a LLaVA folder is
the same model when loaded again as a source: same image tokens, same logits; and a dual-encoder VLA built
from it freezes exactly the trained tower."""
import torch

from vla_scale.config import load_config
from vla_scale.models.loading import build_vla
from vla_scale.models.source_vlm import save_source_vlm

ONE = "model.encoders=[{name: siglip, trainable: true}]"
DUAL = "model.encoders=[{name: frozen, trainable: false}, {name: trained, trainable: true}]"


def _cfg(source, *extra):
    return load_config(None, [f"model.source={source}", "model.image_size=32", "model.projector.init=source", *extra])


def test_saved_source_reloads_to_the_trained_model(tiny_llava, tmp_path):
    torch.manual_seed(0)
    vla, tok = build_vla(_cfg(tiny_llava, ONE).model)
    with torch.no_grad():  # stand-in for the VLM stage: every weight moves
        for p in vla.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_source_vlm(vla, tok, tiny_llava, tmp_path / "vlm")
    again, tok2 = build_vla(_cfg(tmp_path / "vlm", ONE).model)
    assert len(tok2) == len(tok) and tok2.convert_tokens_to_ids("<VLA_PROMPT>") == tok.convert_tokens_to_ids(
        "<VLA_PROMPT>")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[tok.bos_token_id, 10, 11, 12, 13]] * 2)
    vla.eval(), again.eval()
    with torch.no_grad():
        a, b = vla.image_tokens(images), again.image_tokens(images)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        la = vla.core.llm(inputs_embeds=vla.core.llm.get_input_embeddings()(ids)).logits
        lb = again.core.llm(inputs_embeds=again.core.llm.get_input_embeddings()(ids)).logits
        torch.testing.assert_close(lb, la, rtol=0, atol=0)
    # The paper's set-up built on it: the frozen copy IS the VLM-stage tower.
    dual, _ = build_vla(_cfg(tmp_path / "vlm", DUAL).model)
    trained = next(iter(vla.core.encoders.values())).model.state_dict()
    frozen = dual.frozen.encoders["frozen"].model.state_dict()
    assert trained.keys() == frozen.keys()
    for k in trained:
        assert torch.equal(trained[k], frozen[k]), k
