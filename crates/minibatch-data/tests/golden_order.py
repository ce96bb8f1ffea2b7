# Independent ChaCha8 + Lemire + Fisher-Yates, per crates/minibatch-data/src/rng.rs docs.
import struct
M=0xffffffff
def rotl(x,n): return ((x<<n)|(x>>(32-n)))&M
def qr(s,a,b,c,d):
    s[a]=(s[a]+s[b])&M; s[d]=rotl(s[d]^s[a],16)
    s[c]=(s[c]+s[d])&M; s[b]=rotl(s[b]^s[c],12)
    s[a]=(s[a]+s[b])&M; s[d]=rotl(s[d]^s[a],8)
    s[c]=(s[c]+s[d])&M; s[b]=rotl(s[b]^s[c],7)
def block(key,ctr):
    st=[0x61707865,0x3320646e,0x79622d32,0x6b206574]+list(struct.unpack("<8I",key))+[ctr&M,ctr>>32,0,0]
    w=st[:]
    for _ in range(4):
        qr(w,0,4,8,12);qr(w,1,5,9,13);qr(w,2,6,10,14);qr(w,3,7,11,15)
        qr(w,0,5,10,15);qr(w,1,6,11,12);qr(w,2,7,8,13);qr(w,3,4,9,14)
    return [(a+b)&M for a,b in zip(w,st)]
class Rng:
    def __init__(s,seed,epoch,stream):
        s.key=struct.pack("<QQQ",seed,epoch,stream)+b"minibtch"; s.ctr=0; s.buf=[]
    def u32(s):
        if not s.buf: s.buf=block(s.key,s.ctr); s.ctr+=1
        return s.buf.pop(0)
    def u64(s):
        lo=s.u32(); hi=s.u32(); return lo|(hi<<32)
def below(r,n):
    m=r.u64()*n; low=m&(2**64-1)
    if low<n:
        t=(2**64-n)%n
        while low<t:
            m=r.u64()*n; low=m&(2**64-1)
    return m>>64
def perm(n,seed,epoch):
    v=list(range(n)); r=Rng(seed,epoch,0)
    for i in range(n-1,0,-1):
        j=below(r,i+1); v[i],v[j]=v[j],v[i]
    return v
print(perm(10,42,0)); print(perm(10,42,1))
