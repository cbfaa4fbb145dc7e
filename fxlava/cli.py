"""fxlava-compile: compile a SpikingJelly model file into a netx file, print what was built, verify it in Lava."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

import fxlava
from fxlava.blocks import SynapseBlock
from fxlava.options import add_arguments, from_arguments


def _load_object(spec: str, what: str):
    """``path/to/file.py:name`` or ``package.module:name`` -> the named object."""
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part or not name:
        raise SystemExit(f"fxlava-compile: {what} must look like path/to/file.py:name or package.module:name; got {spec!r}")
    if module_part.endswith(".py") or os.sep in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise SystemExit(f"fxlava-compile: no such file: {path}")
        mod_name = f"_fxlava_user_{path.stem}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
        spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(module_part)
    try:
        return getattr(module, name)
    except AttributeError:
        raise SystemExit(f"fxlava-compile: {module_part} has no {name!r}") from None


def load_model(spec: str, weights: str | None) -> nn.Module:
    """The nn.Module named by ``spec`` (or returned by calling it), with an optional state dict loaded."""
    obj = _load_object(spec, "MODEL")
    model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
    if not isinstance(model, nn.Module):
        raise SystemExit(f"fxlava-compile: {spec} is a {type(model).__name__}, not an nn.Module or a callable returning one")
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def _bias_range(block: SynapseBlock) -> str:
    """'[lo, hi] ([mant lo, mant hi])' of the block's quantised bias, or '' without one."""
    if block.bias is None:
        return ""
    q, m = block.quantized_bias.detach(), block.bias_mantissa
    return f"[{q.min():.3f}, {q.max():.3f}] ([{int(m.min())}, {int(m.max())}])"


def layer_table(net: fxlava.CompiledNetwork) -> str:
    """One row per netx layer: type, shape, neurons, synapses, neuron parameters, co-scaling, quantisation of weights and bias."""
    has_bias = any(getattr(b, "bias", None) is not None for b in net.blocks)
    head = ("#", "layer", "output", "neurons", "synapses", "threshold (vThMant)", "iDecay", "vDecay", "scale",
            "weights x scale -> quantised (grid)", "clipped", "to zero") + (("bias quantised (bias_mant)",) if has_bias else ())
    rows = [head, ("0", "input", "x".join(map(str, net.input_shape))) + ("",) * (len(head) - 3)]
    for i, (block, slayer_block) in enumerate(zip(net.blocks, net.lava_dl), start=1):
        if isinstance(block, SynapseBlock):
            w, grid = block.scaled_weight.detach(), block.weight_grid
            q = block.quantized_weight.detach()
            shape = tuple(slayer_block.neuron.shape)
            n = int(torch.tensor(shape).prod())
            rng = f"[{w.min():.3f}, {w.max():.3f}] -> [{q.min():.3f}, {q.max():.3f}] ({grid.name})"
            clipped = int(((w < grid.min) | (w > grid.max)).sum())
            zeroed = int(((q == 0) & (w != 0)).sum())
            nr = block.neuron
            row = (str(i), block.kind, "x".join(map(str, shape)), str(n), str(w.numel()),
                   f"{nr.threshold:g} ({nr.v_th_mant})", f"{nr.current_decay:g} ({nr.i_decay})",
                   f"{nr.voltage_decay:g} ({nr.v_decay})", f"{block.scale:.4g}", rng, str(clipped),
                   f"{zeroed} ({zeroed / w.numel():.0%})")
            if has_bias:
                row += (_bias_range(block),)
            rows.append(row)
        else:
            shape = tuple(slayer_block.shape)
            if block.kind == "flatten":  # slayer keeps it as (features, 1, 1)
                shape = (int(torch.tensor(shape).prod()),)
            rows.append((str(i), block.kind, "x".join(map(str, shape))) + ("",) * (len(head) - 3))
    footer = ""
    synapse_blocks = [(i, b) for i, b in enumerate(net.blocks, start=1) if isinstance(b, SynapseBlock)]
    if any(b.relay_channels for _, b in synapse_blocks):  # skip paths carried as relays (lower_residuals)
        rows[0] = rows[0] + ("relays",)
        relay_of = {i: b for i, b in synapse_blocks}
        neurons = relay_neurons = synapses = relay_synapses = 0
        for r, row in enumerate(rows[1:], start=1):
            b = relay_of.get(int(row[0]))
            cell = ""
            if b is not None:
                per_channel = int(row[3]) // max(b.neuron_channels, 1)
                cell = f"{b.relay_channels} ch, {b.relay_channels * per_channel} neurons" if b.relay_channels else ""
                neurons += int(row[3])
                relay_neurons += b.relay_channels * per_channel
                synapses += int(row[4]) - b.relay_synapses
                relay_synapses += b.relay_synapses
            rows[r] = row + (cell,)
        footer = (f"\nrelay channels (skip paths carried along): {relay_neurons} neurons (+"
                  f"{100 * relay_neurons / max(neurons - relay_neurons, 1):.1f} % of the model's "
                  f"{neurons - relay_neurons}), {relay_synapses} synapses (+{100 * relay_synapses / max(synapses, 1):.1f} % "
                  f"of the model's {synapses})")
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows) + footer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxlava-compile", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="path/to/file.py:name or package.module:name (an nn.Module or a "
                                            "callable returning one)")
    p.add_argument("--input-shape", help="T,N,C,H,W (or T,N,F): the example input, SpikingJelly multi-step layout; "
                                         "N,C,H,W for a model whose forward() repeats its input over time (its "
                                         "ops up to the first spiking layer run on the host: net.encoder)")
    p.add_argument("-o", "--output", help="netx file to write")
    p.add_argument("--weights", help="state dict saved with torch.save")
    p.add_argument("--verify", type=int, nargs="?", const=3, default=0, metavar="K",
                   help="run the written file in Lava's CPU simulator on K random spike inputs (default 3) and "
                        "compare every spike with lava-dl; exits 1 on any mismatch")
    p.add_argument("--verify-data", metavar="FILE",
                   help="a dataset of spike inputs, .npy or .pt, [N, *, T] in lava-dl layout (batch first, time "
                        "last), or of the model's own inputs [N, *] when it has an encoder: run all of them through the written file with fxlava.load_netx (Lava's fixed-point "
                        "arithmetic, batched) and compare with lava-dl, and K of them (--verify K, default 3) in "
                        "Lava itself; exits 1 on any mismatch")
    p.add_argument("--batch", type=int, default=256, help="batch size of --verify-data (default 256)")
    p.add_argument("--pass", dest="user_pass", help="FILE.py:fn or module:fn, a pass to insert (with --after/--before)")
    p.add_argument("--after", help="insert --pass after this pass")
    p.add_argument("--before", help="insert --pass before this pass")
    p.add_argument("--print-pipeline", action="store_true", help="list the passes and stop")
    p.add_argument("--seed", type=int, default=0, help="seed of the random example and verification inputs")
    p.add_argument("--rate", type=float, default=0.3, help="spike probability of the random inputs")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    add_arguments(p)  # one flag per fxlava.compile option (fxlava.options.CompileOptions)
    return p


def _pipeline(args) -> fxlava.Pipeline:
    pipeline = fxlava.default_pipeline()
    if args.bias == "current":
        from fxlava.passes import bias_to_current

        pipeline = pipeline.replace("reject_bias", bias_to_current)
    if args.user_pass:
        fn = _load_object(args.user_pass, "--pass")
        if args.after:
            pipeline = pipeline.insert_after(args.after, fn)
        elif args.before:
            pipeline = pipeline.insert_before(args.before, fn)
        else:
            pipeline = pipeline.append(fn)
    return pipeline


def run(args) -> int:
    pipeline = _pipeline(args)
    if args.print_pipeline:
        print(pipeline)
        return 0
    if not args.model or not args.input_shape or not args.output:
        raise SystemExit("fxlava-compile: MODEL, --input-shape and -o are required (or --print-pipeline)")
    try:
        shape = tuple(int(s) for s in args.input_shape.split(","))
    except ValueError:
        raise SystemExit(f"fxlava-compile: --input-shape must be integers like 8,4,1,28,28; got {args.input_shape!r}")
    g = torch.Generator().manual_seed(args.seed)
    x = (torch.rand(shape, generator=g) < args.rate).float()
    model = load_model(args.model, args.weights)
    options = dataclasses.asdict(from_arguments(args))
    net = fxlava.compile(model, x, pipeline=pipeline, **options)
    print("pipeline:")
    print(pipeline)
    print()
    print(layer_table(net))
    if net.encoder is not None:
        print(f"\nencoder of the input, run on the host (net.encoder), up to {net.encoder.until}: "
              + ", ".join(net.encoder.ops))
    if net.readout.ops:
        print(f"\nreadout of the output spikes, run on the host (net.readout), after {net.readout.after}: "
              + ", ".join(net.readout.ops))
    net.export_hdf5(args.output)
    print(f"\nwrote {args.output}")
    if args.verify_data:
        return verify_data(net, args.output, args.verify_data, lava_samples=args.verify or 3, batch=args.batch)
    if args.verify:
        if net.encoder is not None:  # the model's own inputs, made into spikes on the host
            xin = _encoded(net, torch.rand(args.verify, *shape[1:], generator=g))
        else:
            xin = fxlava.TNX_to_NXT((torch.rand(shape[0], args.verify, *shape[2:], generator=g) < args.rate).float())
        with torch.no_grad():
            expected = net.lava_dl(xin)
        got = fxlava.run_lava(args.output, xin, progress=True)
        same = (got == expected)
        per_sample = same.flatten(1).all(1)
        print(f"verify: {int(per_sample.sum())}/{len(per_sample)} samples equal on every spike; "
              f"{int(same.sum())}/{same.numel()} spikes agree; {int(expected.sum())} output spikes in lava-dl")
        if not bool(per_sample.all()):
            print("verify: MISMATCH between Lava and lava-dl", file=sys.stderr)
            return 1
    return 0


def load_spikes(path: str) -> torch.Tensor:
    """A dataset of spikes from a .npy or .pt file (a tensor or array)."""
    if not os.path.isfile(path):
        raise SystemExit(f"fxlava-compile: no such file: {path}")
    if path.endswith(".npy"):
        import numpy as np

        data = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not torch.is_tensor(data):
        raise SystemExit(f"fxlava-compile: {path} holds a {type(data).__name__}; expected one tensor or array of spikes")
    return data.float()


def _encoded(net: fxlava.CompiledNetwork, x: torch.Tensor) -> torch.Tensor:
    """The spikes [N, *, T] that the netx file takes, made by ``net.encoder`` from the model's own inputs ``x``."""
    with torch.no_grad():
        return fxlava.TNX_to_NXT(net.encoder(x))


def verify_data(net: fxlava.CompiledNetwork, netx_path: str, data_path: str, *, lava_samples: int = 3,
                batch: int = 256) -> int:
    """Run a whole dataset through netx file ``netx_path`` with the executor, ``lava_samples`` of it in Lava; compare with lava-dl."""
    import time

    from tqdm import tqdm

    x = load_spikes(data_path)
    expected = tuple(net.input_shape)
    if net.encoder is not None and tuple(x.shape[1:]) == net.encoder.input_shape:
        encode = True  # the model's own inputs: net.encoder makes their spikes, batch by batch
    elif x.dim() < 3 or tuple(x.shape[1:-1]) != expected:
        hint = ""
        if x.dim() >= 3 and tuple(x.shape[2:]) == expected:
            hint = " (it looks like SpikingJelly's [T, N, *]: permute it with fxlava.TNX_to_NXT)"
        if net.encoder is not None:
            hint += f" or the model's inputs [N, {', '.join(map(str, net.encoder.input_shape))}]"
        raise SystemExit(f"fxlava-compile: {data_path} has shape {tuple(x.shape)}; expected [N, {', '.join(map(str, expected))}, T] "
                         f"in lava-dl layout{hint}")
    else:
        encode = False
    if batch < 1:
        raise SystemExit("fxlava-compile: --batch must be >= 1")
    executor = fxlava.load_netx(netx_path)
    lava_dl = net.lava_dl
    n = x.shape[0]
    same_samples = equal = total = spikes = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, n, batch), desc="netx", unit="batch"):
            xb = _encoded(net, x[start:start + batch]) if encode else x[start:start + batch]
            same = executor(xb) == lava_dl(xb)
            same_samples += int(same.flatten(1).all(1).sum())
            equal += int(same.sum())
            total += same.numel()
    seconds = time.perf_counter() - t0
    print(f"verify-data: {same_samples}/{n} samples of {data_path} equal to lava-dl on every output spike through "
          f"the netx file (fxlava.load_netx, {seconds:.1f} s); {equal}/{total} spikes agree")
    status = 0 if same_samples == n else 1
    k = min(lava_samples, n)
    if k > 0:
        xs = _encoded(net, x[:k]) if encode else x[:k]
        with torch.no_grad():
            ladl = lava_dl(xs)
        got = fxlava.run_lava(netx_path, xs, progress=True)
        same = got == ladl
        lava_same = int(same.flatten(1).all(1).sum())
        print(f"verify-data: {lava_same}/{k} of them in Lava equal to lava-dl on every output spike; "
              f"{int(same.sum())}/{same.numel()} spikes agree")
        status = status or (0 if lava_same == k else 1)
    if status:
        print("verify-data: MISMATCH between the netx file and lava-dl", file=sys.stderr)
    return status


def main(argv=None) -> int:
    """Console entry point."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except fxlava.FxlavaError as exc:
        if args.debug:
            raise
        print(f"fxlava-compile: {exc}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"fxlava-compile: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
