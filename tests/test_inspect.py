"""``fastpeft inspect``: the command, its records, and the SASS reading behind them."""

import json
import os

import pytest

pytest.importorskip("triton")

from fastpeft.cli import main  # noqa: E402
from fastpeft.kernels import inspect as I  # noqa: E402

LOOP_SASS = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;                 /* 0x000 */
        /*0110*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;   /* 0x000 */
        /*0120*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR16][R92.64], !P1 ;        /* 0x000 */
        /*0130*/                   WARPGROUP.ARRIVE ;                     /* 0x000 */
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;            /* 0x000 */
        /*0150*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;      /* 0x000 */
        /*0160*/                   LDS.128 R4, [R2] ;                     /* 0x000 */
        /*0170*/                   IADD3 R2, R2, 0x40, RZ ;               /* 0x000 */
        /*0180*/              @!P1 BRA 0x130 ;                            /* 0x000 */
        /*0190*/                   FMUL R3, R4, R5 ;                      /* 0x000 */
        /*01a0*/                   IADD3 R7, R7, 0x1, RZ ;                /* 0x000 */
        /*01b0*/               @P0 BRA 0x190 ;                            /* 0x000 */
        /*01c0*/                   STL [R1], R3 ;                         /* 0x000 */
        /*01d0*/                   EXIT ;                                 /* 0x000 */
        /*01e0*/                   BRA 0x1e0;                             /* 0x000 */
"""


def test_main_loop_is_the_backward_branch_with_the_most_mma():
    loop = I.main_loop(LOOP_SASS)
    assert loop == {"total": 6, "mma": 2, "memory": 1, "other": 3, "tma_load": 0, "ldgsts": 0, "start": 0x130,
                    "end": 0x180, "body": 6, "mma_kind": "HGMMA"}
    counts = I.analyse_sass(LOOP_SASS)
    assert counts["mma"] == 3 and counts["mma_kind"] == "HGMMA" and counts["ldgsts"] == 1
    assert (counts["ldl"], counts["stl"]) == (0, 1)
    assert I.main_loop("        /*0100*/                   EXIT ;\n") is None


# a persistent kernel: a loop over tiles (0x100-0x1c0) around a k-loop (0x130-0x160); then the
# same flattened into one loop whose once-per-tile prologue (0x210-0x230) and epilogue
# (0x270-0x290) sit under predicated forward branches, with a wait stub after the code that
# branches back into the loop (0x2e0)
NESTED_SASS = """
        /*0100*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;   /* 0x000 */
        /*0110*/                   IADD3 R2, R2, 0x40, RZ ;               /* 0x000 */
        /*0120*/                   IADD3 R3, R2, 0x40, RZ ;               /* 0x000 */
        /*0130*/                   UTMALDG.2D [UR4], [UR16] ;             /* 0x000 */
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;            /* 0x000 */
        /*0150*/                   IADD3 R2, R2, 0x40, RZ ;               /* 0x000 */
        /*0160*/              @!P1 BRA 0x130 ;                            /* 0x000 */
        /*0170*/                   STG.E [R4.64], R24 ;                   /* 0x000 */
        /*0180*/                   FMUL R3, R4, R5 ;                      /* 0x000 */
        /*0190*/                   FMUL R3, R4, R5 ;                      /* 0x000 */
        /*01c0*/               @P0 BRA 0x100 ;                            /* 0x000 */
        /*0200*/                   IADD3 R2, R2, 0x40, RZ ;               /* 0x000 */
        /*0210*/               @P2 BRA 0x240 ;                            /* 0x000 */
        /*0220*/                   LDG.E R6, [R4.64] ;                    /* 0x000 */
        /*0230*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;   /* 0x000 */
        /*0240*/                   UTMALDG.2D [UR4], [UR16] ;             /* 0x000 */
        /*0250*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;            /* 0x000 */
        /*0260*/               @P3 BRA 0x2a0 ;                            /* 0x000 */
        /*0270*/                   FMUL R3, R4, R5 ;                      /* 0x000 */
        /*0280*/                   STG.E [R4.64], R24 ;                   /* 0x000 */
        /*0290*/                   FMUL R3, R4, R5 ;                      /* 0x000 */
        /*02a0*/              @!P0 BRA 0x200 ;                            /* 0x000 */
        /*02b0*/                   EXIT ;                                 /* 0x000 */
        /*02c0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR20+0x27000], R161 ;  /* 0x000 */
        /*02d0*/              @!P3 BRA 0x2c0 ;                            /* 0x000 */
        /*02e0*/                   BRA 0x250 ;                            /* 0x000 */
"""


def test_main_loop_is_innermost_and_skips_once_per_tile_regions():
    nested = NESTED_SASS.split("/*0200*/")[0]
    assert I.main_loop(nested) == {"total": 4, "mma": 1, "memory": 1, "other": 2, "tma_load": 1, "ldgsts": 0,
                                   "start": 0x130, "end": 0x160, "body": 4, "mma_kind": "HGMMA"}
    flat = "\n".join(ln for ln in NESTED_SASS.splitlines() if "/*02" in ln or "/*01" not in ln)
    assert I.main_loop(flat) == {"total": 6, "mma": 1, "memory": 1, "other": 4, "tma_load": 1, "ldgsts": 0,
                                 "start": 0x200, "end": 0x2a0, "body": 11, "mma_kind": "HGMMA"}


@pytest.mark.parametrize("argv,flag", [
    (["--shape", "12"], "--shape"), (["--dropout", "1.5"], "dropout"), (["--arch", "75"], "--arch"),
    (["--M", "0"], "M"), (["--method", "bitfit"], "bitfit"), (["--method", "nope"], "nope"),
])
def test_bad_flags_exit_2_naming_them(capsys, argv, flag):
    with pytest.raises(SystemExit) as err:
        main(["inspect", *argv])
    assert err.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.slow
def test_decode_call_of_the_4bit_op(tmp_path, capsys):
    """A decode call (M = 1, no grad) of the 4-bit op on sm_80: the table, one JSON record per
    kernel × config naming a cubin written into --dump with its SASS, the decode kernel's
    non-MMA instructions per weight, traffic and floors from the shapes."""
    out, dump = tmp_path / "r.json", tmp_path / "bins"
    assert main(["inspect", "--op", "4bit", "--arch", "80", "--shape", "256x192", "--M", "1", "--r", "8",
                 "--dropout", "0", "--json", str(out), "--dump", str(dump)]) == 0
    table = capsys.readouterr().out
    assert "decode call" in table and "sm_80" in table and "lowrank4_decode" in table
    report = json.loads(out.read_text())
    names = [r["kernel"] for r in report["records"]]
    assert "_lowrank4_decode_kernel" in names and "_lowrank4_fwd_gemm_kernel" not in names
    for rec in report["records"]:
        assert not rec["error"]
        assert os.path.exists(rec["cubin"]) and os.path.exists(rec["cubin"][:-len(".cubin")] + ".sass")
        assert rec["registers"] > 0 and rec["hbm_bytes"] > 0 and rec["floor_us"]["A100"] > 0
        assert rec["spills"]["ldl"] == 0 and rec["spills"]["stl"] == 0
    decode = next(r for r in report["records"] if r["kernel"] == "_lowrank4_decode_kernel")
    assert decode["non_mma_per_weight"] > 0
    assert decode["hbm_bytes"] >= 256 * 192 // 2               # at least the packed weight
    assert report["kernel_launches"] == report["launches"] + len(report["torch_kernels"])


@pytest.mark.slow
def test_training_step_launches_and_specialisation():
    """A dense LoRA training step with dropout at an aligned shape: every launch of forward and
    backward is captured, every autotune config of a launch compiles, sizes divisible by 16 carry
    the divisibility attribute, and the GEMMs' main loops have wgmma fed by TMA on sm_90."""
    report = I.inspect_kernels(op="dense", arch=90, k=256, d=128, M=512, r=16, dropout=0.1)
    kernels = {r["kernel"] for r in report.records}
    assert {"_lowrank_fwd_t_kernel", "_lowrank_fwd_gemm_tma_kernel", "_lowrank_bwd_dy_kernel",
            "_lowrank_bwd_dx_tma_kernel", "_lowrank_bwd_da_kernel"} <= kernels
    assert report.launches == len({r["launch"] for r in report.records}) == 5
    assert not [r for r in report.records if r["error"]]
    gemm = [r for r in report.records if r["kernel"] == "_lowrank_fwd_gemm_tma_kernel"]
    assert len(gemm) >= 2 and all(r["autotuned"] for r in gemm)
    assert all(r["specialisation"]["attrs"]["K"] == [["tt.divisibility", 16]] for r in gemm)
    gemms = gemm + [r for r in report.records if r["kernel"] == "_lowrank_bwd_dx_tma_kernel"]
    assert all("HGMMA" in r["main_loop"]["mma_kind"] and r["main_loop"]["tma_load"] and not r["main_loop"]["ldgsts"]
               for r in gemms)
    assert "floor H100" in report.table() and report.floor_us("H200") > 0


@pytest.mark.slow
def test_4bit_problems_capture_the_in_register_kernels_unless_told(monkeypatch):
    """Above the dense-buffer crossover the op runs the buffered path by default; inspect captures
    the in-register kernels (whose cost sets the crossover) unless FASTPEFT_4BIT_BUFFER_MIN_M is
    set."""
    from fastpeft.kernels import lowrank_4bit as L4
    problem = I.Problem(op="4bit", M=8192, k=256, d=256, r=16)
    monkeypatch.delenv(L4.BUFFER_MIN_M_ENV, raising=False)
    names = {job.name for job in I.capture_problems([problem])[0][0]}
    assert {"_lowrank4_fwd_gemm_tma_kernel", "_lowrank4_bwd_dx_tma_kernel"} <= names and "_dequant4_kernel" not in names
    monkeypatch.setenv(L4.BUFFER_MIN_M_ENV, "1")
    names = {job.name for job in I.capture_problems([problem])[0][0]}
    assert "_dequant4_kernel" in names and not {"_lowrank4_fwd_gemm_kernel", "_lowrank4_fwd_gemm_tma_kernel"} & names


# Triton launches of one training step of one layer (the grouped op: three projections of one
# input): forward T pass + GEMM(s); backward the pass over dY (per projection), dX, and dA where
# A trains. No finalize, partial-sum or U kernel: their work runs inside those launches.
STEP_LAUNCHES = {
    "dense": {"lora": 5, "lora_fa": 4, "lamda": 4, "vera": 4},
    "4bit": {"lora": 5, "lora_fa": 4, "lamda": 4, "vera": 4},
    "group": {"lora": 9, "lora_fa": 8, "lamda": 8, "vera": 8},
}
STEP_KERNELS = {
    "dense": {"_lowrank_fwd_t_kernel", "_lowrank_fwd_gemm_kernel", "_lowrank_bwd_dy_kernel", "_lowrank_bwd_dx_kernel"},
    "4bit": {"_lowrank_fwd_t_kernel", "_lowrank4_fwd_gemm_kernel", "_lowrank_bwd_dy_kernel",
             "_lowrank4_bwd_dx_kernel"},
    "group": {"_lowrank_fwd_t_kernel", "_lowrank_fwd_gemm_kernel", "_lowrank_bwd_dy_kernel",
              "_lowrank_group_bwd_dx_kernel"},
}
# on sm_90, with aligned 16-bit operands, the forward GEMMs and dX run their TMA kernels (the 4-bit
# dX not with an out_scale, VeRA's, which scales each dY tile: the pointer kernel)
SM90_TMA = {"_lowrank_fwd_gemm_kernel": "_lowrank_fwd_gemm_tma_kernel",
            "_lowrank_bwd_dx_kernel": "_lowrank_bwd_dx_tma_kernel",
            "_lowrank4_fwd_gemm_kernel": "_lowrank4_fwd_gemm_tma_kernel",
            "_lowrank4_bwd_dx_kernel": "_lowrank4_bwd_dx_tma_kernel"}


def test_launches_per_training_step():
    """Launches of one training step (Triton launches plus torch kernels, as ``fastpeft inspect``
    counts them): LoRA (A trains) 5 on the dense and 4-bit ops, LoRA-FA, LaMDA and VeRA (A
    frozen) 4; the grouped op of three projections 9 and 8. No torch fill in any: the grouped
    op's only torch kernels concatenate its parameters (A, the cores)."""
    problems = [I.Problem(op=op, arch=arch, k=256, d=128, M=512, r=16, dropout=0.1, method=method)
                for op in STEP_LAUNCHES for method in STEP_LAUNCHES[op] for arch in (80, 90)]
    for problem, (jobs, torch_ops) in zip(problems, I.capture_problems(problems)):
        what, arch = problem.describe(), problem.arch
        launches = {j.launch: j.name for j in jobs}
        expected = STEP_LAUNCHES[problem.op][problem.method]
        names = {SM90_TMA.get(n, n) if arch == 90 else n for n in STEP_KERNELS[problem.op]}
        if arch == 90 and problem.op == "4bit" and problem.method == "vera":
            names = names - {"_lowrank4_bwd_dx_tma_kernel"} | {"_lowrank4_bwd_dx_kernel"}
        names |= {"_lowrank_bwd_da_kernel"} if problem.method == "lora" else set()
        assert len(launches) == expected and set(launches.values()) == names, f"{what}: {sorted(launches.values())}"
        if problem.op == "group":
            assert set(torch_ops) <= {"cat", "block_diag"} and len(torch_ops) <= 3, f"{what}: {torch_ops}"
        else:
            assert torch_ops == [], f"{what}: {torch_ops}"
        report = I.Report(problem, [], len(launches), torch_ops, [])
        assert report.kernel_launches == expected + len(torch_ops)
        if problem.op != "group":
            assert report.kernel_launches <= (5 if problem.method == "lora" else 4), what
