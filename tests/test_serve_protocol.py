"""The OpenAI request rules of `medvl serve`, without a model or a socket (medvl.server.protocol)."""

from __future__ import annotations

import base64

import pytest

from medvl.server.protocol import ApiError, Limits, parse_chat_request

PNG_1PX = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100"
    "18dd8db00000000049454e44ae426082")).decode()


def parse(body, *, roots=(), vision=True, limits=None):
    return parse_chat_request(body, limits=limits or Limits(), served_model="m", image_roots=list(roots),
                              vision=vision)


def user(content):
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


def image_block(url):
    return {"type": "image_url", "image_url": {"url": url}}


def refused(body, status=400, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, **kw)
    assert info.value.status == status
    body = info.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return info.value


def test_text_request_becomes_turns_with_the_system_prompt_apart():
    req = parse({"model": "m", "messages": [
        {"role": "system", "content": "You are a radiologist."},
        {"role": "user", "content": "What is a pneumothorax?"},
        {"role": "assistant", "content": "Air in the pleural space."},
        {"role": "user", "content": [{"type": "text", "text": "And its sign on X-ray?"}]}],
        "max_tokens": 7, "temperature": 0.3, "top_p": 0.9, "seed": 3})
    assert req.system == "You are a radiologist."
    assert [(m.role, m.text) for m in req.messages] == [("user", "What is a pneumothorax?"),
                                                      ("assistant", "Air in the pleural space."),
                                                      ("user", "And its sign on X-ray?")]
    assert (req.max_new_tokens, req.temperature, req.top_p, req.seed, req.stream) == (7, 0.3, 0.9, 3, False)


def test_defaults_are_greedy_with_the_chat_budget():
    req = parse(user("hi"))
    assert req.temperature is None and req.top_p is None and req.max_new_tokens == 512


def test_the_default_budget_stays_within_a_lower_max_tokens():
    """`medvl serve --max-tokens 100`: a request that names no max_tokens gets 100, not a refusal for 512."""
    assert parse(user("hi"), limits=Limits(max_new_tokens=100)).max_new_tokens == 100
    assert refused({**user("hi"), "max_tokens": 101}, limits=Limits(max_new_tokens=100)).param == "max_tokens"


def test_data_url_image_is_kept_as_bytes_with_its_type():
    req = parse(user([{"type": "text", "text": "What is shown?"},
                      image_block(f"data:image/png;base64,{PNG_1PX}")]))
    (im,) = req.images
    assert im.data[:4] == b"\x89PNG" and im.suffix == ".png" and im.path is None


def test_remote_urls_are_refused_with_the_fix():
    err = refused(user([{"type": "text", "text": "q"}, image_block("https://example.org/x.png")]))
    assert err.code == "remote_url_refused" and "data URL" in err.message
    assert err.param == "messages[0].content[1].image_url"


def test_local_paths_only_under_the_image_roots(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    (root / "ct.png").write_bytes(base64.b64decode(PNG_1PX))
    (tmp_path / "secret.png").write_bytes(b"x")
    ok = parse(user([{"type": "text", "text": "q"}, image_block(f"file://{root}/ct.png")]), roots=[root])
    assert ok.images[0].path == str(root / "ct.png")
    escaping = f"{root}/../secret.png"
    err = refused(user([{"type": "text", "text": "q"}, image_block(escaping)]), roots=[root])
    assert err.code == "image_path_refused"
    err = refused(user([{"type": "text", "text": "q"}, image_block(str(root / "ct.png"))]))  # no root at all
    assert err.code == "image_path_refused"
    err = refused(user([{"type": "text", "text": "q"}, image_block("scans/ct.png")]), roots=[root])
    assert "absolute" in err.message


@pytest.mark.parametrize("body, param", [
    ([], None),
    ({"messages": [{"role": "user", "content": "q"}]}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "q"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "a"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 10**6}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 5}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": "yes"}, "stream"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "  "}]}, "messages"),
])
def test_bad_requests_name_the_field(body, param):
    assert refused(body).param == param


def test_unknown_model_is_404():
    err = refused({"model": "other", "messages": [{"role": "user", "content": "q"}]}, status=404)
    assert err.code == "model_not_found"


def test_image_limits_and_text_only_models():
    blocks = [{"type": "text", "text": "q"}] + [image_block(f"data:image/png;base64,{PNG_1PX}")] * 3
    assert refused(user(blocks), limits=Limits(max_images=2)).code == "too_many_images"
    assert refused(user(blocks), vision=False).code == "images_not_supported"
    bad = [{"type": "text", "text": "q"}, image_block("data:image/png;base64,@@@")]
    assert "base64" in refused(user(bad)).message
    assert "unsupported image type" in refused(user([{"type": "text", "text": "q"},
                                                     image_block("data:text/html;base64,AAAA")])).message
