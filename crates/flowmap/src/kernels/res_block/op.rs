//! The residual block's candle op: the forward pass keeping `c1` alone, and the backward pass that
//! recomputes both normalised activations image by image.

use super::*;

impl CustomOp3 for ResBlockOp {
    fn name(&self) -> &'static str {
        "flowmap-res-block"
    }

    fn cpu_fwd(
        &self,
        xas: &CpuStorage,
        xal: &Layout,
        xbs: &CpuStorage,
        xbl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xa, p) = (cpu_slice(xas, xal, "x")?, cpu_slice(ps, pl, "params")?);
        let xb = if self.two {
            Some(cpu_slice(xbs, xbl, "x")?)
        } else {
            None
        };
        let sh = self.shapes(xal, xbl, p.len())?;
        let pp = self.parts(p, &sh);
        let s = pp.ss;
        let (hw, c, o) = (sh.hw(), sh.c_in(), sh.c_out());
        let zeros = vec![0.0f32; c];
        let (n_out, groups) = (sh.b * o * hw, self.groups);
        let keep = self.kept.is_some();
        // The output, and what the backward pass will need: c1 and both norms' group statistics.
        let mut y: Vec<f32> = Vec::with_capacity(n_out);
        let mut c1_all: Vec<f32> = Vec::with_capacity(if keep { n_out } else { 0 });
        let (mut st1_all, mut st2_all) = (
            vec![(0.0f32, 0.0f32); sh.b * groups],
            vec![(0.0f32, 0.0f32); sh.b * groups],
        );
        let per = IMAGES_PER_BLOCK * o * hw;
        let c1_blocks: Vec<Option<&mut [MaybeUninit<f32>]>> = if keep {
            c1_all.spare_capacity_mut()[..n_out].chunks_mut(per).map(Some).collect()
        } else {
            (0..sh.b.div_ceil(IMAGES_PER_BLOCK)).map(|_| None).collect()
        };
        let blocks: Vec<_> = y.spare_capacity_mut()[..n_out]
            .chunks_mut(per)
            .zip(c1_blocks)
            .zip(
                st1_all
                    .chunks_mut(IMAGES_PER_BLOCK * groups)
                    .zip(st2_all.chunks_mut(IMAGES_PER_BLOCK * groups)),
            )
            .enumerate()
            .collect();
        map_blocks(blocks, |(i, ((yb, mut c1b), (st1b, st2b)))| {
            // Every element of these is written before it is read.
            let (mut n1, mut xcat) = (Scratch::new(c * hw), Scratch::new(if self.two { c * hw } else { 0 }));
            let (mut n2, mut c1_own) = (Scratch::new(o * hw), Scratch::new(if keep { 0 } else { o * hw }));
            let (mut cols1, mut cols2) = (sh.g1.cols_scratch(), sh.g2.cols_scratch());
            let alone = sh.b == 1;
            for (j, yi) in yb.chunks_mut(o * hw).enumerate() {
                let img = i * IMAGES_PER_BLOCK + j;
                let xi = sh.image(img, xa, xb, &mut xcat);
                let (a, shift) = s[img * 2 * o..(img + 1) * 2 * o].split_at(o);
                let st1 = &mut st1b[j * groups..(j + 1) * groups];
                let m1 = (pp.gamma1, pp.beta1, &zeros[..], &zeros[..]);
                stats_normalise(xi, sh.d1, self.eps, m1, st1, &mut n1, alone);
                let c1 = match c1b.as_deref_mut() {
                    Some(all) => conv::fill_bias(&mut all[j * o * hw..(j + 1) * o * hw], pp.b1, hw),
                    // SAFETY: `fill_bias` writes only initialised values.
                    None => conv::fill_bias(unsafe { crate::kernels::dense::as_uninit(&mut c1_own) }, pp.b1, hw),
                };
                conv::forward_image_alone(sh.g1, pp.w1, &n1, &mut cols1, c1, alone);
                let st2 = &mut st2b[j * groups..(j + 1) * groups];
                stats_normalise(
                    c1,
                    sh.d2,
                    self.eps,
                    (pp.gamma2, pp.beta2, a, shift),
                    st2,
                    &mut n2,
                    alone,
                );
                // y = skip(x) + b2 + W2 ⋆ n2, each row started at its bias (and at x for the identity).
                for (ch, row) in yi.chunks_mut(hw).enumerate() {
                    if self.skip {
                        row.fill(MaybeUninit::new(pp.bs[ch] + pp.b2[ch]));
                    } else {
                        for (d, &v) in row.iter_mut().zip(&xi[ch * hw..(ch + 1) * hw]) {
                            *d = MaybeUninit::new(v + pp.b2[ch]);
                        }
                    }
                }
                // SAFETY: every element of the image's output was just written.
                let yi = unsafe { crate::kernels::dense::assume_init(yi) };
                if self.skip {
                    conv::forward_image_alone(sh.gs, pp.ws, xi, &mut [], yi, alone);
                }
                conv::forward_image_alone(sh.g2, pp.w2, &n2, &mut cols2, yi, alone);
            }
        });
        // SAFETY: the blocks cover all `n_out` elements of both, and every image wrote all of its own.
        unsafe {
            y.set_len(n_out);
            if keep {
                c1_all.set_len(n_out);
            }
        }
        if let Some(kept) = &self.kept {
            *kept.lock().expect("kept activation") = Kept {
                c1: c1_all,
                stats1: st1_all,
                stats2: st2_all,
            };
        }
        Ok((CpuStorage::F32(y), Shape::from((sh.b, o, sh.g1.h, sh.g1.w))))
    }

    fn bwd(
        &self,
        xa: &Tensor,
        xb: &Tensor,
        params: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (Some(xar), Some(xbr), Some(pr), Some(gr)) = (
            crate::kernels::read(xa),
            crate::kernels::read(xb),
            crate::kernels::read(params),
            crate::kernels::read(&grad),
        ) else {
            candle_core::bail!("residual block backward needs contiguous f32 CPU tensors");
        };
        let (xas, p, gs) = (xar.slice(), pr.slice(), gr.slice());
        let xbs = if self.two { Some(xbr.slice()) } else { None };
        let sh = self.shapes(xa.layout(), xb.layout(), p.len())?;
        let pp = self.parts(p, &sh);
        let s = pp.ss;
        let (hw, c, o) = (sh.hw(), sh.c_in(), sh.c_out());
        let Some(kept) = &self.kept else {
            candle_core::bail!("residual block backward: the forward pass kept no activation");
        };
        let kept = kept.lock().expect("kept activation");
        let (c1_all, stats1, stats2) = (&kept.c1[..], &kept.stats1[..], &kept.stats2[..]);
        let groups = self.groups;
        if c1_all.len() != sh.b * o * hw || stats1.len() != sh.b * groups {
            candle_core::bail!("residual block backward: the kept activation does not fit the input");
        }
        let zeros = vec![0.0f32; c];
        let (back1, back2, backs) = (
            conv::Backward::new(sh.g1, pp.w1),
            conv::Backward::new(sh.g2, pp.w2),
            conv::Backward::new(sh.gs, pp.ws),
        );
        // The input gradient, per input tensor, and the scale-shift's.
        let (c_a, c_b) = (sh.c_a, c - sh.c_a);
        // Every element of the input gradients is written before it is read (GroupNorm's backward writes
        // `dx`, the two-part case copies into both); they are zeroed only to be initialised memory, and
        // block by block on the workers: a `vec![0.0; n]` here was a serial memset of the whole batch (0.75%
        // of a 32-channel teacher step at batch 128).
        let (n_a, n_b) = (sh.b * c_a * hw, if self.two { sh.b * c_b * hw } else { 0 });
        let (mut dxa, mut dxb) = (Vec::<f32>::with_capacity(n_a), Vec::<f32>::with_capacity(n_b));
        let mut dss = vec![0.0f32; sh.b * 2 * o];
        let dxb_blocks: Vec<&mut [MaybeUninit<f32>]> = if self.two {
            dxb.spare_capacity_mut()[..n_b]
                .chunks_mut(IMAGES_PER_BLOCK * c_b * hw)
                .collect()
        } else {
            (0..sh.b.div_ceil(IMAGES_PER_BLOCK))
                .map(|_| Default::default())
                .collect()
        };
        let blocks: Vec<_> = dxa.spare_capacity_mut()[..n_a]
            .chunks_mut(IMAGES_PER_BLOCK * c_a * hw)
            .zip(dxb_blocks)
            .zip(dss.chunks_mut(IMAGES_PER_BLOCK * 2 * o))
            .enumerate()
            .collect();
        struct Partial {
            conv1: Vec<f32>,
            conv2: Vec<f32>,
            skip: Vec<f32>,
            norm1: Vec<f32>,
            norm2: Vec<f32>,
        }
        let partials = map_blocks(blocks, |(i, ((dxab, dxbb), dssb))| {
            let (dxab, dxbb) = (zeroed(dxab), zeroed(dxbb));
            let mut part = Partial {
                conv1: back1.partial(),
                conv2: back2.partial(),
                skip: if self.skip { backs.partial() } else { Vec::new() },
                norm1: vec![0.0f32; 2 * c],
                norm2: vec![0.0f32; 2 * o],
            };
            // Scratch: every element is written before it is read (the norms and the convolutions'
            // backward passes overwrite their outputs).
            let (mut n1, mut dn1, mut gx1) = (Scratch::new(c * hw), Scratch::new(c * hw), Scratch::new(c * hw));
            let (mut n2, mut dn2, mut dc1, mut gx2) = (
                Scratch::new(o * hw),
                Scratch::new(o * hw),
                Scratch::new(o * hw),
                Scratch::new(o * hw),
            );
            let mut dskip = Scratch::new(if self.skip { c * hw } else { 0 });
            let two = if self.two { c * hw } else { 0 };
            let (mut xcat, mut dxcat) = (Scratch::new(two), Scratch::new(two));
            let (mut cols1, mut cols2) = (sh.g1.g_cols_scratch(), sh.g2.g_cols_scratch());
            for (j, dssi) in dssb.chunks_mut(2 * o).enumerate() {
                let img = i * IMAGES_PER_BLOCK + j;
                let xi = sh.image(img, xas, xbs, &mut xcat);
                // ∂/∂x of the concatenated image: straight into the one input's gradient, or into `dxcat`.
                let dxi: &mut [f32] = if self.two {
                    &mut dxcat
                } else {
                    &mut dxab[j * c * hw..(j + 1) * c * hw]
                };
                let c1 = &c1_all[img * o * hw..(img + 1) * o * hw];
                let gi = &gs[img * o * hw..(img + 1) * o * hw];
                let (a, shift) = s[img * 2 * o..(img + 1) * 2 * o].split_at(o);
                let acc = j > 0;
                // h = W2 ⋆ n2 + b2: ∂/∂n2, then through GN2 to c1 and the scale-shift.
                let st2 = &stats2[img * groups..(img + 1) * groups];
                normalise(c1, sh.d2, st2, pp.gamma2, pp.beta2, a, shift, &mut n2);
                back2.image(&n2, gi, &mut cols2, &mut dn2, &mut part.conv2, acc);
                let sums2 = |ch: usize, [g_a, g_sh, g_gamma, g_beta]: [f32; 4]| {
                    dssi[ch] = g_a;
                    dssi[o + ch] = g_sh;
                    part.norm2[ch] += g_gamma;
                    part.norm2[o + ch] += g_beta;
                };
                let channel2 = norm::backward_channel(pp.gamma2, pp.beta2, a, shift);
                norm::backward_image(c1, &dn2, sh.d2, st2, true, channel2, sums2, &mut gx2, &mut dc1);
                // c1 = W1 ⋆ n1 + b1: ∂/∂n1, then through GN1 to x.
                let st1 = &stats1[img * groups..(img + 1) * groups];
                normalise(xi, sh.d1, st1, pp.gamma1, pp.beta1, &zeros, &zeros, &mut n1);
                back1.image(&n1, &dc1, &mut cols1, &mut dn1, &mut part.conv1, acc);
                let sums1 = |ch: usize, [_, _, g_gamma, g_beta]: [f32; 4]| {
                    part.norm1[ch] += g_gamma;
                    part.norm1[c + ch] += g_beta;
                };
                let channel1 = norm::backward_channel(pp.gamma1, pp.beta1, &zeros, &zeros);
                norm::backward_image(xi, &dn1, sh.d1, st1, true, channel1, sums1, &mut gx1, dxi);
                // The skip path: ∂/∂x += Wsᵀ·g (or g itself).
                if self.skip {
                    backs.image(xi, gi, &mut [], &mut dskip, &mut part.skip, acc);
                    crate::kernels::simd::add_assign(dxi, &dskip);
                } else {
                    crate::kernels::simd::add_assign(dxi, gi);
                }
                if self.two {
                    let (da, db) = dxcat.split_at(c_a * hw);
                    dxab[j * c_a * hw..(j + 1) * c_a * hw].copy_from_slice(da);
                    dxbb[j * c_b * hw..(j + 1) * c_b * hw].copy_from_slice(db);
                }
            }
            part
        });
        // One field of every block's partial sums, in block order.
        let mut partials = partials;
        let mut field = |f: fn(&mut Partial) -> &mut Vec<f32>| -> Vec<Vec<f32>> {
            partials.iter_mut().map(|p| std::mem::take(f(p))).collect()
        };
        let (conv1, conv2, skip) = (field(|p| &mut p.conv1), field(|p| &mut p.conv2), field(|p| &mut p.skip));
        let (norm1, norm2) = (field(|p| &mut p.norm1), field(|p| &mut p.norm2));
        let (dw1, db1) = back1.finish(conv1);
        let (dw2, db2) = back2.finish(conv2);
        let sum = |v| sum_in_order(v).unwrap_or_default();
        let mut dp = dss;
        dp.extend(sum(norm1));
        dp.extend(dw1.iter().chain(&db1));
        dp.extend(sum(norm2));
        dp.extend(dw2.iter().chain(&db2));
        if self.skip {
            let (dws, dbs) = backs.finish(skip);
            dp.extend(dws.iter().chain(&dbs));
        }
        // SAFETY: every block zeroed its part of the spare capacity (`zeroed`), and the blocks cover it.
        unsafe {
            dxa.set_len(n_a);
            dxb.set_len(n_b);
        }
        let (dev, (b, _, h, w)) = (xa.device(), xa.dims4()?);
        Ok((
            Some(Tensor::from_vec(dxa, (b, c_a, h, w), dev)?),
            self.two
                .then(|| Tensor::from_vec(dxb, (b, c_b, h, w), dev))
                .transpose()?,
            Some(Tensor::from_vec(dp, params.shape(), dev)?),
        ))
    }
}
