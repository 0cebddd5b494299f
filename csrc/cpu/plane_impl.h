// The plane passes of plane_passes.h, one function per pass over one chunk of one (b, c) plane.
// Included by kernels_impl.h inside its per-ISA anonymous namespace (so compiled once per ISA,
// like every kernel there), and by cuda/hgru_cuda.cu, whose kernel calls each function on one
// element per thread (CUDA: device functions, no SIMD pragmas). The math is
// crbp_fast/hgru/reference.py's: linearize_tracked, column_sums, step_vjp and the passes of
// lcp_tangent, with the sets' means already reduced into the plane's scalars by the caller.
// Every pointer is valid: the drivers pass zeros for a None input and a scratch element for a
// skipped output, so each loop is one branch-free body.
#ifdef __CUDACC__
#define CRBP_PLANE_FN __device__ __forceinline__
#define CRBP_PLANE_SIMD
#define CRBP_PLANE_SIMD_SUM(...)
#else
#define CRBP_PLANE_FN inline
#define CRBP_PLANE_PRAGMA_(x) _Pragma(#x)
#define CRBP_PLANE_SIMD _Pragma("omp simd")
#define CRBP_PLANE_SIMD_SUM(...) CRBP_PLANE_PRAGMA_(omp simd reduction(+ : __VA_ARGS__))
#endif

template <typename T>
CRBP_PLANE_FN void plane_dot(const PlaneArgs<T>& a) {
  const T* x = a.in[0];
  const T* y = a.in[1];
  double s0 = 0, s1 = 0;
CRBP_PLANE_SIMD_SUM(s0, s1)
  for (int64_t i = 0; i < a.n; ++i) {
    const double u = static_cast<double>(x[i]);
    s0 += u;
    s1 += u * static_cast<double>(y[i]);
  }
  a.sums[0] = s0;
  a.sums[1] = s1;
}

// g1_t = g1 (1 - g1) m1 (m1 = U1 w), hg_t = w g1 + h g1_t.
template <typename T>
CRBP_PLANE_FN void tangent_gate_inh(const PlaneArgs<T>& a) {
  const T *w = a.in[tgi::w], *g1 = a.in[tgi::g1], *h = a.in[tgi::h], *m1 = a.in[tgi::m1];
  T *g1_t = a.out[tgi::g1_t], *hg_t = a.out[tgi::hg_t];
CRBP_PLANE_SIMD
  for (int64_t i = 0; i < a.n; ++i) {
    const T g = g1[i];
    const T gt = g * (T(1) - g) * m1[i];
    g1_t[i] = gt;
    hg_t[i] = w[i] * g + h[i] * gt;
  }
}

// xhat1_t = invstd (c_t - mean(c_t) - xhat1 mean(xhat1 c_t)), c1_t = weight xhat1_t,
// q_t = c1_t (alpha h + mu) + c1 alpha w, r_t = -sigma(q) q_t, h1_t = sigma(r) r_t.
template <typename T>
CRBP_PLANE_FN void tangent_inhibit(const PlaneArgs<T>& a) {
  const T *ct = a.in[tin::c1_raw_t], *xh = a.in[tin::xhat1], *k_c1 = a.in[tin::dc1_coef], *c1 = a.in[tin::c1];
  const T *w = a.in[tin::w], *s_q = a.in[tin::s_q], *s_r = a.in[tin::s_r];
  T *xt_o = a.out[tin::xhat1_t], *c1t_o = a.out[tin::c1_t], *qt_o = a.out[tin::q_t], *rt_o = a.out[tin::r_t];
  T* h1t_o = a.out[tin::h1_t];
  const T invstd = a.s[tin::invstd], m_t = a.s[tin::mean_t], m_xt = a.s[tin::mean_xt];
  const T weight = a.s[tin::weight], alpha = a.s[tin::alpha];
CRBP_PLANE_SIMD
  for (int64_t i = 0; i < a.n; ++i) {
    const T xt = invstd * (ct[i] - m_t - xh[i] * m_xt);
    const T c1t = weight * xt;
    const T qt = c1t * k_c1[i] + c1[i] * (alpha * w[i]);
    const T rt = -s_q[i] * qt;
    xt_o[i] = xt;
    c1t_o[i] = c1t;
    qt_o[i] = qt;
    rt_o[i] = rt;
    h1t_o[i] = s_r[i] * rt;
  }
}

// The forward tangent after the exc conv (its norm, e, hh, z), then the tangent of the
// column-sum pass down to dc2_t, with the per-plane sums of the kappa, gamma, omega gradients
// and of the norm's (dc2_t xhat2 + dc2 xhat2_t, dc2_t, dc2 xhat2).
template <typename T>
CRBP_PLANE_FN void tangent_excite_mix(const PlaneArgs<T>& a) {
  const T *ct = a.in[tex::c2_raw_t], *xh = a.in[tex::xhat2], *w = a.in[tex::w], *h1_t = a.in[tex::h1_t];
  const T *g2_t = a.in[tex::g2_t], *c2 = a.in[tex::c2], *h1 = a.in[tex::h1], *s_e = a.in[tex::s_e];
  const T *g2 = a.in[tex::g2], *hmh = a.in[tex::hh_minus_h], *s_z = a.in[tex::s_z], *v = a.in[tex::v];
  const T *dz = a.in[tex::dz], *de = a.in[tex::de], *k_c2 = a.in[tex::dc2_coef], *k_h1 = a.in[tex::dh1_coef];
  const T *slope = a.in[tex::g2_slope], *dc2 = a.in[tex::dc2];
  T *xt_o = a.out[tex::xhat2_t], *dc2t_o = a.out[tex::dc2_t], *dh1t_o = a.out[tex::dh1_t];
  T *dht_o = a.out[tex::dh_t], *dm2t_o = a.out[tex::dm2_t];
  const T invstd = a.s[tex::invstd], m_t = a.s[tex::mean_t], m_xt = a.s[tex::mean_xt], weight = a.s[tex::weight];
  const T kappa = a.s[tex::kappa], gamma = a.s[tex::gamma], omega = a.s[tex::omega];
  double sk = 0, sg = 0, so = 0, sp = 0, sq = 0, sr = 0;
CRBP_PLANE_SIMD_SUM(sk, sg, so, sp, sq, sr)
  for (int64_t i = 0; i < a.n; ++i) {
    const T xt = invstd * (ct[i] - m_t - xh[i] * m_xt);
    const T c2t = weight * xt;
    const T h1t = h1_t[i], g2t = g2_t[i], g = g2[i], se = s_e[i], sz = s_z[i], dzi = dz[i], dei = de[i];
    const T cross = h1t * c2[i] + h1[i] * c2t;
    const T et = kappa * h1t + gamma * c2t + omega * cross;
    const T hht = se * et;
    const T zt = (T(1) - g) * w[i] + g2t * hmh[i] + g * hht;
    const T dzt = sz * (T(1) - sz) * zt + v[i] * sz;
    const T set_ = se * (T(1) - se) * et;
    const T det = dzt * g * se + dzi * (g2t * se + g * set_);
    dm2t_o[i] = (dzt * hmh[i] + dzi * (hht - w[i])) * slope[i] + dzi * hmh[i] * (T(1) - T(2) * g) * g2t;
    dht_o[i] = dzt * (T(1) - g) - dzi * g2t;
    const T dc2t = det * k_c2[i] + dei * omega * h1t;
    dc2t_o[i] = dc2t;
    dh1t_o[i] = det * k_h1[i] + dei * omega * c2t;
    xt_o[i] = xt;
    sk += static_cast<double>(det * h1[i] + dei * h1t);
    sg += static_cast<double>(det * c2[i] + dei * c2t);
    so += static_cast<double>(det * h1[i] * c2[i] + dei * cross);
    sp += static_cast<double>(dc2t * xh[i] + dc2[i] * xt);
    sq += static_cast<double>(dc2t);
    sr += static_cast<double>(dc2[i] * xh[i]);
  }
  a.sums[tex::s_kappa] = sk;
  a.sums[tex::s_gamma] = sg;
  a.sums[tex::s_omega] = so;
  a.sums[tex::s_dc_xhat_t] = sp;
  a.sums[tex::s_dc_t] = sq;
  a.sums[tex::s_dc_xhat] = sr;
}

// dr_t = rel_t dr + invstd (weight dc_t - mean(dxh_t) - xhat_t mean(dxh xhat) - xhat mean(dxh_t xhat + dxh xhat_t)).
template <typename T>
CRBP_PLANE_FN void norm_vjp_tangent(const PlaneArgs<T>& a) {
  const T *dr = a.in[nvt::dr], *dct = a.in[nvt::dc_t], *xt = a.in[nvt::xhat_t], *xh = a.in[nvt::xhat];
  T* out = a.out[nvt::dr_t];
  const T rel = a.s[nvt::rel_t], invstd = a.s[nvt::invstd], weight = a.s[nvt::weight];
  const T m1 = a.s[nvt::mean_dxh_t], m2 = a.s[nvt::mean_dxh_xhat], m3 = a.s[nvt::mean_mixed];
CRBP_PLANE_SIMD
  for (int64_t i = 0; i < a.n; ++i) out[i] = rel * dr[i] + invstd * (weight * dct[i] - m1 - xt[i] * m2 - xh[i] * m3);
}

// dx, dh_t and dc1_t after the transposed exc conv (its term dh1_t_extra added here), with the
// per-plane sums of the alpha and mu gradients and of the inh norm's.
template <typename T>
CRBP_PLANE_FN void tangent_vjp_inhibit(const PlaneArgs<T>& a) {
  const T *d1 = a.in[tvi::dh1_t], *d2 = a.in[tvi::dh1_t_extra], *s_r = a.in[tvi::s_r], *r_t = a.in[tvi::r_t];
  const T *s_q = a.in[tvi::s_q], *q_t = a.in[tvi::q_t], *dh1 = a.in[tvi::dh1], *k_q = a.in[tvi::dq_coef];
  const T *k_c1 = a.in[tvi::dc1_coef], *dq = a.in[tvi::dq], *w = a.in[tvi::w], *c1 = a.in[tvi::c1];
  const T *c1_t = a.in[tvi::c1_t], *h = a.in[tvi::h], *dh_t = a.in[tvi::dh_t], *xh = a.in[tvi::xhat1];
  const T *dc1 = a.in[tvi::dc1], *xt = a.in[tvi::xhat1_t];
  T *dx_o = a.out[tvi::dx], *dht_o = a.out[tvi::dh_t_out], *dc1t_o = a.out[tvi::dc1_t];
  const T alpha = a.s[tvi::alpha];
  double sa = 0, sm = 0, sp = 0, sq = 0, sr = 0;
CRBP_PLANE_SIMD_SUM(sa, sm, sp, sq, sr)
  for (int64_t i = 0; i < a.n; ++i) {
    const T d = d1[i] + d2[i];
    const T sr_ = s_r[i], sq_ = s_q[i], g = dh1[i], dqi = dq[i];
    const T s_r_t = sr_ * (T(1) - sr_) * r_t[i];
    const T s_q_t = sq_ * (T(1) - sq_) * q_t[i];
    dx_o[i] = d * sr_ + g * s_r_t;
    const T dqt = d * k_q[i] - g * (s_r_t * sq_ + sr_ * s_q_t);
    const T dc1t = dqt * k_c1[i] + dqi * (alpha * w[i]);
    const T da = dqi * c1[i];
    const T dat = dqt * c1[i] + dqi * c1_t[i];
    dht_o[i] = dh_t[i] + dat * alpha;
    dc1t_o[i] = dc1t;
    sa += static_cast<double>(dat * h[i] + da * w[i]);
    sm += static_cast<double>(dat);
    sp += static_cast<double>(dc1t * xh[i] + dc1[i] * xt[i]);
    sq += static_cast<double>(dc1t);
    sr += static_cast<double>(dc1[i] * xh[i]);
  }
  a.sums[tvi::s_alpha] = sa;
  a.sums[tvi::s_mu] = sm;
  a.sums[tvi::s_dc_xhat_t] = sp;
  a.sums[tvi::s_dc_t] = sq;
  a.sums[tvi::s_dc_xhat] = sr;
}

// dm1 = dhg hg1_slope, dm1_t = dhg_t hg1_slope + dhg (w g1 (1 - g1) + h (1 - 2 g1) g1_t),
// dh_t += dhg_t g1 + dhg g1_t (the U1^T term is the caller's mix of dm1_t).
template <typename T>
CRBP_PLANE_FN void tangent_vjp_gate_inh(const PlaneArgs<T>& a) {
  const T *dhg_t = a.in[tvg::dhg_t], *dhg = a.in[tvg::dhg], *slope = a.in[tvg::hg1_slope], *w = a.in[tvg::w];
  const T *g1 = a.in[tvg::g1], *h = a.in[tvg::h], *g1_t = a.in[tvg::g1_t], *dh_t = a.in[tvg::dh_t];
  T *dm1t_o = a.out[tvg::dm1_t], *dm1_o = a.out[tvg::dm1], *dht_o = a.out[tvg::dh_t_out];
CRBP_PLANE_SIMD
  for (int64_t i = 0; i < a.n; ++i) {
    const T g = g1[i], d = dhg[i], dt = dhg_t[i];
    dm1_o[i] = d * slope[i];
    dm1t_o[i] = dt * slope[i] + d * (w[i] * (g * (T(1) - g)) + h[i] * (T(1) - T(2) * g) * g1_t[i]);
    dht_o[i] = dh_t[i] + dt * g + d * g1_t[i];
  }
}

// The inhibition of linearize_tracked: c1 = N(c1_raw), its xhat1, a = alpha h + mu, sigma(q),
// sigma(r), -sigma(r) sigma(q), c1 alpha and h1 = sp(r), r = x - sp(c1 a).
template <typename T>
CRBP_PLANE_FN void tracked_inhibit(const PlaneArgs<T>& a) {
  const T *raw = a.in[tri::c1_raw], *x = a.in[tri::x], *h = a.in[tri::h];
  T *c1_o = a.out[tri::c1], *xh_o = a.out[tri::xhat1], *a_o = a.out[tri::dc1_coef], *sq_o = a.out[tri::s_q];
  T *sr_o = a.out[tri::s_r], *kq_o = a.out[tri::dq_coef], *kh_o = a.out[tri::dh_q_coef], *h1_o = a.out[tri::h1];
  const T mean = a.s[tri::mean], invstd = a.s[tri::invstd], weight = a.s[tri::weight], bias = a.s[tri::bias];
  const T alpha = a.s[tri::alpha], mu = a.s[tri::mu];
CRBP_PLANE_SIMD
  for (int64_t i = 0; i < a.n; ++i) {
    const T xh = (raw[i] - mean) * invstd;
    const T c1 = xh * weight + bias;
    const T gate = alpha * h[i] + mu;
    T sp_q, sig_q, h1, sig_r;
    softplus_sigmoid(c1 * gate, sp_q, sig_q);
    softplus_sigmoid(x[i] - sp_q, h1, sig_r);
    c1_o[i] = c1;
    xh_o[i] = xh;
    a_o[i] = gate;
    sq_o[i] = sig_q;
    sr_o[i] = sig_r;
    kq_o[i] = -sig_r * sig_q;
    kh_o[i] = c1 * alpha;
    h1_o[i] = h1;
  }
}

// The excitation and mix of linearize_tracked: F, sigma(z), hh - h, sigma(e), gamma + omega h1,
// kappa + omega c2, g2 (1 - g2), xhat2 and c2 = N(c2_raw).
template <typename T>
CRBP_PLANE_FN void tracked_excite_mix(const PlaneArgs<T>& a) {
  const T *raw = a.in[trx::c2_raw], *h = a.in[trx::h], *h1 = a.in[trx::h1], *g2 = a.in[trx::g2];
  T *f_o = a.out[trx::state], *sz_o = a.out[trx::s_z], *hmh_o = a.out[trx::hh_minus_h], *se_o = a.out[trx::s_e];
  T *kc2_o = a.out[trx::dc2_coef], *kh1_o = a.out[trx::dh1_coef], *sl_o = a.out[trx::g2_slope];
  T *xh_o = a.out[trx::xhat2], *c2_o = a.out[trx::c2];
  const T mean = a.s[trx::mean], invstd = a.s[trx::invstd], weight = a.s[trx::weight], bias = a.s[trx::bias];
  const T kappa = a.s[trx::kappa], gamma = a.s[trx::gamma], omega = a.s[trx::omega];
CRBP_PLANE_SIMD
  for (int64_t i = 0; i < a.n; ++i) {
    const T xh = (raw[i] - mean) * invstd;
    const T c2 = xh * weight + bias;
    const T u = h1[i], g = g2[i];
    T hh, sig_e, f, sig_z;
    softplus_sigmoid(kappa * u + gamma * c2 + omega * u * c2, hh, sig_e);
    softplus_sigmoid((T(1) - g) * h[i] + g * hh, f, sig_z);
    f_o[i] = f;
    sz_o[i] = sig_z;
    hmh_o[i] = hh - h[i];
    se_o[i] = sig_e;
    kc2_o[i] = gamma + omega * u;
    kh1_o[i] = kappa + omega * c2;
    sl_o[i] = g * (T(1) - g);
    xh_o[i] = xh;
    c2_o[i] = c2;
  }
}

// The column-sum pass at v = 1 after the exc conv: de = s_z g2 s_e, dm2 = s_z (hh - h) g2 (1 - g2),
// dc2 = de (gamma + omega h1).
template <typename T>
CRBP_PLANE_FN void column_sums_excite_mix(const PlaneArgs<T>& a) {
  const T *s_z = a.in[cse::s_z], *g2 = a.in[cse::g2], *s_e = a.in[cse::s_e], *hmh = a.in[cse::hh_minus_h];
  const T *slope = a.in[cse::g2_slope], *k_c2 = a.in[cse::dc2_coef];
  T *de_o = a.out[cse::de], *dm2_o = a.out[cse::dm2], *dc2_o = a.out[cse::dc2];
CRBP_PLANE_SIMD
  for (int64_t i = 0; i < a.n; ++i) {
    const T de = s_z[i] * g2[i] * s_e[i];
    de_o[i] = de;
    dm2_o[i] = s_z[i] * hmh[i] * slope[i];
    dc2_o[i] = de * k_c2[i];
  }
}

// After the transposed exc conv: dh1 = de dh1_coef + U2^T dm2 + the conv term, dq, dc1, and dh =
// s_z (1 - g2) + dq c1 alpha (the rest of u is the caller's gate VJP).
template <typename T>
CRBP_PLANE_FN void column_sums_inhibit(const PlaneArgs<T>& a) {
  const T *de = a.in[csi::de], *k_h1 = a.in[csi::dh1_coef], *mix = a.in[csi::dh1_mix], *cv = a.in[csi::dh1_conv];
  const T *k_q = a.in[csi::dq_coef], *k_c1 = a.in[csi::dc1_coef], *s_z = a.in[csi::s_z], *g2 = a.in[csi::g2];
  const T* k_h = a.in[csi::dh_q_coef];
  T *dh1_o = a.out[csi::dh1], *dq_o = a.out[csi::dq], *dc1_o = a.out[csi::dc1], *dh_o = a.out[csi::dh];
CRBP_PLANE_SIMD
  for (int64_t i = 0; i < a.n; ++i) {
    const T dh1 = de[i] * k_h1[i] + mix[i] + cv[i];
    const T dq = dh1 * k_q[i];
    dh1_o[i] = dh1;
    dq_o[i] = dq;
    dc1_o[i] = dq * k_c1[i];
    dh_o[i] = s_z[i] * (T(1) - g2[i]) + dq * k_h[i];
  }
}

// The tracked step's VJP after the exc conv: dm2, dc2, dh1 (without the U2^T and conv terms) and
// dh so far, with the per-plane sums of the kappa, gamma, omega gradients, of the exc norm's
// (dc2 xhat2, dc2) and of dm2 (the U2 bias gradient).
template <typename T>
CRBP_PLANE_FN void step_vjp_excite_mix(const PlaneArgs<T>& a) {
  const T *v = a.in[sve::v], *s_z = a.in[sve::s_z], *g2 = a.in[sve::g2], *s_e = a.in[sve::s_e];
  const T *hmh = a.in[sve::hh_minus_h], *slope = a.in[sve::g2_slope], *k_c2 = a.in[sve::dc2_coef];
  const T *k_h1 = a.in[sve::dh1_coef], *h1 = a.in[sve::h1], *c2 = a.in[sve::c2], *xh = a.in[sve::xhat2];
  T *dm2_o = a.out[sve::dm2], *dc2_o = a.out[sve::dc2], *dh1_o = a.out[sve::dh1], *dh_o = a.out[sve::dh];
  double sk = 0, sg = 0, so = 0, sx = 0, sc = 0, sm = 0;
CRBP_PLANE_SIMD_SUM(sk, sg, so, sx, sc, sm)
  for (int64_t i = 0; i < a.n; ++i) {
    const T dz = v[i] * s_z[i];
    const T g = g2[i];
    const T de = dz * g * s_e[i];
    const T dm2 = dz * hmh[i] * slope[i];
    const T dc2 = de * k_c2[i];
    dm2_o[i] = dm2;
    dc2_o[i] = dc2;
    dh1_o[i] = de * k_h1[i];
    dh_o[i] = dz * (T(1) - g);
    sk += static_cast<double>(de * h1[i]);
    sg += static_cast<double>(de * c2[i]);
    so += static_cast<double>(de * h1[i] * c2[i]);
    sx += static_cast<double>(dc2 * xh[i]);
    sc += static_cast<double>(dc2);
    sm += static_cast<double>(dm2);
  }
  a.sums[sve::s_kappa] = sk;
  a.sums[sve::s_gamma] = sg;
  a.sums[sve::s_omega] = so;
  a.sums[sve::s_dc_xhat] = sx;
  a.sums[sve::s_dc] = sc;
  a.sums[sve::s_dm2] = sm;
}

// After the transposed exc conv (its term dh1_extra added here): dx, dc1 and dh with the
// inhibition's term, with the per-plane sums of the alpha and mu gradients and the inh norm's.
template <typename T>
CRBP_PLANE_FN void step_vjp_inhibit(const PlaneArgs<T>& a) {
  const T *d1 = a.in[svi::dh1], *d2 = a.in[svi::dh1_extra], *s_r = a.in[svi::s_r], *k_q = a.in[svi::dq_coef];
  const T *k_c1 = a.in[svi::dc1_coef], *c1 = a.in[svi::c1], *h = a.in[svi::h], *dh = a.in[svi::dh];
  const T* xh = a.in[svi::xhat1];
  T *dx_o = a.out[svi::dx], *dc1_o = a.out[svi::dc1], *dh_o = a.out[svi::dh_out];
  const T alpha = a.s[svi::alpha];
  double sa = 0, sm = 0, sx = 0, sc = 0;
CRBP_PLANE_SIMD_SUM(sa, sm, sx, sc)
  for (int64_t i = 0; i < a.n; ++i) {
    const T d = d1[i] + d2[i];
    const T dq = d * k_q[i];
    const T dc1 = dq * k_c1[i];
    const T da = dq * c1[i];
    dx_o[i] = d * s_r[i];
    dc1_o[i] = dc1;
    dh_o[i] = dh[i] + da * alpha;
    sa += static_cast<double>(da * h[i]);
    sm += static_cast<double>(da);
    sx += static_cast<double>(dc1 * xh[i]);
    sc += static_cast<double>(dc1);
  }
  a.sums[svi::s_alpha] = sa;
  a.sums[svi::s_mu] = sm;
  a.sums[svi::s_dc_xhat] = sx;
  a.sums[svi::s_dc] = sc;
}

// The native VJP's factors (crbp_fast/hgru/native/hgru.py, Factors) from the tracked step's:
// products of the reference factors, so the adjoint needs no second linearisation.
template <typename T>
CRBP_PLANE_FN void native_factors(const PlaneArgs<T>& a) {
  const T *k_q = a.in[nfa::dq_coef], *k_c1 = a.in[nfa::dc1_coef], *k_hq = a.in[nfa::dh_q_coef];
  const T *s_z = a.in[nfa::s_z], *g2 = a.in[nfa::g2], *s_e = a.in[nfa::s_e], *k_c2 = a.in[nfa::dc2_coef];
  const T *k_h1 = a.in[nfa::dh1_coef], *hmh = a.in[nfa::hh_minus_h], *slope = a.in[nfa::g2_slope];
  T *o_c1 = a.out[nfa::dh1_to_dc1], *o_h = a.out[nfa::dh1_to_dh], *o_c2 = a.out[nfa::v_to_dc2];
  T *o_h1 = a.out[nfa::v_to_dh1], *o_m2 = a.out[nfa::v_to_dm2], *o_vh = a.out[nfa::v_to_dh];
CRBP_PLANE_SIMD
  for (int64_t i = 0; i < a.n; ++i) {
    const T sz = s_z[i], g = g2[i];
    const T de = sz * g * s_e[i];
    o_c1[i] = k_q[i] * k_c1[i];
    o_h[i] = k_q[i] * k_hq[i];
    o_c2[i] = de * k_c2[i];
    o_h1[i] = de * k_h1[i];
    o_m2[i] = sz * hmh[i] * slope[i];
    o_vh[i] = sz * (T(1) - g);
  }
}

#undef CRBP_PLANE_FN
#undef CRBP_PLANE_SIMD
#undef CRBP_PLANE_SIMD_SUM
#ifdef CRBP_PLANE_PRAGMA_
#undef CRBP_PLANE_PRAGMA_
#endif
