import time, torch
import tiny_models as tm

def test_probe():
    for kind in tm.KINDS:
        t0=time.time(); p = tm.build(kind); t1=time.time()
        n = sum(x.numel() for x in p.model.diffusion_model.parameters())/1e6
        out = tm.run_sampler(p); t2=time.time()
        out1 = tm.run_sampler(p, cfg=1.0); t3=time.time()
        outh = tm.run_sampler(p, sampler="heun", steps=2); t4=time.time()
        print(f"{kind}: {n:.1f}M build {t1-t0:.2f}s euler4 cfg7.5 {t2-t1:.2f}s cfg1 {t3-t2:.2f}s heun2 {t4-t3:.2f}s  out std {out.std():.3f} mean {out.mean():.3f} finite {torch.isfinite(out).all().item()} shape {tuple(out.shape)}")
