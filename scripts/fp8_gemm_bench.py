"""FP8 against bf16 GEMMs on the GPU (issue 22): per shape of the Qwen2.5-1.5B and Llama-3.1-8B linears, 16384 tokens,
the forward (x @ W.T), the input gradient (dy @ W), fp8 with a cached transposed weight or transposing per call, the
cost of quantizing x (e4m3) and dy (e5m2), rowwise scaling, and compiled forward+backward of a frozen linear, in
microseconds (triton.testing.do_bench), with the fp8 output's relative error.
    python3 scripts/fp8_gemm_bench.py      (an H100/H200: torch._scaled_mm needs compute capability 8.9+)
"""
import torch,torch.nn.functional as F
from triton.testing import do_bench as B
print(torch.__version__,torch.version.cuda,torch.cuda.get_device_name(),hasattr(F,'scaled_mm'))
E4=torch.float8_e4m3fn;E5=torch.float8_e5m2;bf=torch.bfloat16
def q(t,dt,row=False):
  mx=torch.finfo(dt).max
  a=t.abs().amax(-1,keepdim=True) if row else t.abs().amax()
  s=mx/a.float().clamp(min=1e-12)
  return (t.float()*s).clamp(-mx,mx).to(dt),s.reciprocal()
qc=torch.compile(q)
sm=torch._scaled_mm
class FL(torch.autograd.Function):
  @staticmethod
  def forward(ctx,x,w,ws,wt):
    xs=x.reshape(-1,x.shape[-1]);xq,xsc=q(xs,E4)
    ctx.save_for_backward(w,ws,wt)
    return sm(xq,w.t(),xsc,ws,out_dtype=bf,use_fast_accum=True).view(*x.shape[:-1],-1)
  @staticmethod
  def backward(ctx,g):
    w,ws,wt=ctx.saved_tensors;g2=g.reshape(-1,g.shape[-1]);gq,gs=q(g2,E5)
    return sm(gq,wt.t(),gs,ws,out_dtype=bf).view(*g.shape[:-1],-1),None,None,None
def fp8f(x,w,ws,wt):return FL.apply(x,w,ws,wt)
fc=torch.compile(fp8f);lc=torch.compile(F.linear)
M=16384
for K,N in [(1536,1536),(1536,256),(1536,8960),(8960,1536),(4096,4096),(4096,1024),(4096,14336),(14336,4096)]:
  x=torch.randn(M,K,device='cuda',dtype=bf);W=torch.randn(N,K,device='cuda',dtype=bf)*.02;gy=torch.randn(M,N,device='cuda',dtype=bf)
  wq,ws=q(W,E4);wqt=wq.t().contiguous();xq,xs=q(x,E4);gq,gs=q(gy,E5)
  r={}
  r['bf_f']=B(lambda:x@W.t());r['bf_dg']=B(lambda:gy@W)
  r['f8_f']=B(lambda:sm(xq,wq.t(),xs,ws,out_dtype=bf,use_fast_accum=True))
  r['f8_dg']=B(lambda:sm(gq,wqt.t(),gs,ws,out_dtype=bf))
  r['f8_dg_tr']=B(lambda:sm(gq,wq.t().contiguous().t(),gs,ws,out_dtype=bf))
  r['q_x']=B(lambda:qc(x,E4));r['q_g']=B(lambda:qc(gy,E5))
  xr,xrs=q(x,E4,True);wr,wrs=q(W,E4,True)
  try:r['row_f']=B(lambda:sm(xr,wr.t(),xrs,wrs.t(),out_dtype=bf,use_fast_accum=True))
  except Exception as e:r['row_f']=str(e)[:60]
  gr,grs=q(gy,E5,True);wc,wcs=q(W.t().contiguous(),E4,True)
  try:r['row_dg_e5']=B(lambda:sm(gr,wc.t(),grs,wcs.t(),out_dtype=bf))
  except Exception as e:r['row_dg_e5']=str(e)[:60]
  xi=x.clone().requires_grad_();xi2=x.clone().requires_grad_()
  def bfb():lc(xi,W).backward(gy)
  def f8b():fc(xi2,wq,ws,wqt).backward(gy)
  r['bf_fb_comp']=B(bfb);r['f8_fb_comp']=B(f8b)
  y1=F.linear(x,W);y2=fp8f(x,wq,ws,wqt);r['rel_err']=((y1-y2).float().norm()/y1.float().norm()).item()
  print(K,N,{k:(round(v*1000,1) if isinstance(v,float) and k!='rel_err' else v) for k,v in r.items()},flush=True)
