"""The exfiltration-shape detector: encoded labels and bursts are flagged, real hostnames are not."""

from __future__ import annotations

import base64
import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.policy.suspicious import (
    Observation,
    Thresholds,
    detect,
    flagged_names,
    is_public_suffix,
    label_reasons,
    name_reasons,
    registrable_domain,
    spans_public_suffix,
    wildcard_ok,
)

T0 = 1_700_000_000.0

# Real-looking names an agent (or its package managers, browsers, SDKs) asks for.
REAL_NAMES = """
www.google.com api.github.com codeload.github.com objects.githubusercontent.com raw.githubusercontent.com
pkg-containers.githubusercontent.com release-assets.githubusercontent.com ghcr.io pypi.org
files.pythonhosted.org registry.npmjs.org registry.yarnpkg.com proxy.golang.org sum.golang.org
index.crates.io static.crates.io static.rust-lang.org deb.debian.org security.debian.org
archive.ubuntu.com ppa.launchpadcontent.net dl-cdn.alpinelinux.org mirrors.fedoraproject.org
download.docker.com registry-1.docker.io auth.docker.io production.cloudflare.docker.com huggingface.co
cdn-lfs.huggingface.co cdn-lfs-us-1.huggingface.co cas-bridge.xethub.hf.co api.openai.com
api.anthropic.com statsig.anthropic.com sentry.io o450000.ingest.sentry.io o1158394.ingest.us.sentry.io
o4505678901234567.ingest.sentry.io browser-intake-datadoghq.com http-intake.logs.datadoghq.com
storage.googleapis.com oauth2.googleapis.com safebrowsing.googleapis.com www.googletagmanager.com
fonts.gstatic.com clients2.google.com r3---sn-4g5e6nz7.googlevideo.com rr2---sn-q4flrnsd.googlevideo.com
login.microsoftonline.com graph.microsoft.com management.azure.com myaccount.blob.core.windows.net
e6858.dscx.akamaiedge.net a1b2.example.com cdn-1.example.com us-east-1.console.aws.amazon.com
s3.us-west-2.amazonaws.com sts.us-east-1.amazonaws.com my-lb-1234567890.us-east-1.elb.amazonaws.com
ec2-54-210-123-45.compute-1.amazonaws.com ip-10-0-1-23.ec2.internal my-bucket.s3.amazonaws.com
abc123def.execute-api.us-east-1.amazonaws.com d3h1lg3ksw6i6b.cloudfront.net xn--bcher-kva.example
www.xn--80ak6aa92e.com xn--mnchen-3ya.de xn--80aswg.xn--p1ai xn--fiqs8s.xn--55qx5d.cn en.wikipedia.org
upload.wikimedia.org cdn.sstatic.net docs.python.org mcr.microsoft.com dc.services.visualstudio.com
vscode.download.prss.microsoft.com az764295.vo.msecnd.net registry.k8s.io europe-west1-docker.pkg.dev
cdn01.quay.io public.ecr.aws api.stripe.com hooks.slack.com gateway.discord.gg 0.pool.ntp.org
connectivity-check.ubuntu.com incoming.telemetry.mozilla.org ocsp.digicert.com crl3.digicert.com
r3.o.lencr.org acme-v02.api.letsencrypt.org kubernetes-dashboard-production.internal.example.com
prod-eu-west-1-starport-layer-bucket.s3.eu-west-1.amazonaws.com production-ai-gateway-eastus2.example.net
zeta-ai-platform-prd-usw2.example.net international-standard-book.example.org _dmarc.example.com
_acme-challenge.example.com _sip._tcp.example.com 1.2.3.4.in-addr.arpa 8.b.d.0.1.0.0.2.ip6.arpa
api-v2.example.io staging-api-eu.example.dev node-1.cluster-7.example.net worker-03.build-farm.example.org
gitlab-org.gitlab.io my-app-7f3c.vercel.app service-abc123-uc.a.run.app array511.prod.do.dsp.mp.microsoft.com
v10.events.data.microsoft.com settings-win.data.microsoft.com cdn.jsdelivr.net cdnjs.cloudflare.com
conda.anaconda.org repo1.maven.org plugins.gradle.org get.helm.sh us.i.posthog.com api-js.mixpanel.com
""".split()


def b32_label(rng: random.Random, nbytes: int) -> str:
    return base64.b32encode(rng.randbytes(nbytes)).decode().rstrip("=").lower()


def b64_label(rng: random.Random, nbytes: int) -> str:
    return base64.urlsafe_b64encode(rng.randbytes(nbytes)).decode().rstrip("=").lower()


# ---------------------------------------------------------------- public suffixes
@pytest.mark.parametrize(("name", "registrable"), [
    ("www.example.com", "example.com"),
    ("example.com", "example.com"),
    ("a.b.example.co.uk", "example.co.uk"),
    ("user.github.io", "user.github.io"),
    ("x.y.user.github.io", "user.github.io"),
    ("bucket.s3.amazonaws.com", "bucket.s3.amazonaws.com"),
    ("sts.amazonaws.com", "amazonaws.com"),
    ("allowed.test", "allowed.test"),        # unknown TLDs are one-label suffixes
    ("pypi.org.lan", "org.lan"),
    ("com", None), ("co.uk", None), ("github.io", None), ("s3.amazonaws.com", None),
])
def test_registrable_domain_uses_the_private_section(name: str, registrable: str | None) -> None:
    assert registrable_domain(name) == registrable
    assert is_public_suffix(name) == (registrable is None)


@pytest.mark.parametrize("parent", ["com", "co.uk", "github.io", "amazonaws.com", "s3.amazonaws.com",
                                    "compute-1.amazonaws.com", "windows.net", "test", "uk"])
def test_no_wildcard_at_or_above_a_public_suffix(parent: str) -> None:
    assert not wildcard_ok(parent)


@pytest.mark.parametrize("parent", ["example.com", "api.example.com", "example.co.uk", "user.github.io",
                                    "bucket.s3.amazonaws.com", "example.test"])
def test_wildcard_allowed_at_or_below_a_registrable_domain(parent: str) -> None:
    assert wildcard_ok(parent)
    assert not spans_public_suffix(parent)


# ------------------------------------------------------------------------ labels
@pytest.mark.parametrize("label", ["www", "api", "cdn-1", "us-east-1", "a1b2", "xn--bcher-kva",
                                   "xn--80ak6aa92e", "e6858", "r3---sn-4g5e6nz7", "ec2-54-210-123-45",
                                   "kubernetes-dashboard-production", "o4505678901234567", "_acme-challenge",
                                   "deadbeef", "abcdefabcdefabcd", "thisisaverylongdomainname"])
def test_normal_labels_are_not_flagged(label: str) -> None:
    assert label_reasons(label) == []


def test_real_names_are_not_flagged() -> None:
    flagged = {n: name_reasons(n) for n in REAL_NAMES if name_reasons(n)}
    assert flagged == {}
    obs = [Observation(n, T0 + i * 7.0, T0 + i * 7.0 + 3600, 5) for i, n in enumerate(REAL_NAMES)]
    assert detect(obs) == []


def test_word_like_labels_are_not_flagged() -> None:
    """Thousands of service-style labels built from words and region codes: no false positives."""
    rng = random.Random(7)
    words = ("api web app prod staging dev test cdn static assets media images video auth login account "
             "user data metrics logs events telemetry analytics tracking ingest edge gateway proxy cache "
             "mirror download update registry packages repo git build runner worker node cluster east "
             "west north south central europe asia primary secondary backup internal external public "
             "private service backend frontend mobile desktop client server admin dashboard portal "
             "console status health monitor alerts mail secure identity oauth token storage bucket blob "
             "files object content upload search index docs help support community forum blog").split()
    tails = ["us-east-1", "eu-west-2", "ap-south-1", "use1", "euw1", "2024", "v2", "v3", "01", "02", "x64",
             "arm64", "k8s", "s3", "ec2"]
    checked = 0
    for _ in range(5000):
        parts = rng.sample(words, rng.randint(1, 3))
        if rng.random() < 0.6:
            parts.append(rng.choice(tails))
        label = rng.choice(["-", "-", ""]).join(parts)
        if len(label) > 40:
            continue
        checked += 1
        assert label_reasons(label) == [], label
    assert checked > 4000


def test_long_labels_are_flagged() -> None:
    label = "a" * 41
    assert [k for k, _ in label_reasons(label)] == ["long-label"]
    assert label_reasons("a" * 40) == []
    assert label_reasons("a" * 30, Thresholds(max_label=20))[0][0] == "long-label"


@pytest.mark.parametrize("label", ["4f2a9c0e1b7d3a55", "0123456789abcdef0123", "deadbeef00c0ffee11",
                                   "3f2504e0-4f89-11d3-9a0c-0305e82c3301"])
def test_hex_labels_are_flagged(label: str) -> None:
    assert [k for k, _ in label_reasons(label)] == ["hex"]


def test_encoded_labels_are_mostly_flagged_one_by_one() -> None:
    rng = random.Random(11)
    for make, nbytes, at_least in ((b32_label, 20, 0.95), (b32_label, 30, 0.99), (b64_label, 24, 0.9),
                                   (lambda r, n: r.randbytes(n).hex(), 10, 0.99)):
        hits = sum(bool(label_reasons(make(rng, nbytes))) for _ in range(500))
        assert hits / 500 >= at_least, (make, nbytes, hits)


def test_unusual_bytes_are_flagged() -> None:
    assert [k for k, _ in name_reasons("a\\000b.example.com")] == ["charset"]
    assert [k for k, _ in name_reasons("a\\.b.example.com")] == ["charset"]
    # ... wherever they are: a registrable domain with an escaped byte is no hostname either.
    assert [k for k, _ in name_reasons("x\\.y.com")] == ["charset"]
    assert [k for k, _ in name_reasons("www.a\\000b.com")] == ["charset"]
    assert registrable_domain("www.a\\000b.com") == "a\\000b.com"
    assert registrable_domain("a\\.b.example.co.uk") == "example.co.uk"


def test_only_labels_below_the_registrable_domain_are_judged() -> None:
    # The registrable domain itself was chosen once; it cannot carry per-lookup data.
    assert name_reasons("4f2a9c0e1b7d3a554f2a.com") == []
    assert name_reasons("www.4f2a9c0e1b7d3a554f2a.com") == []
    assert name_reasons("4f2a9c0e1b7d3a554f2a.example.com") != []
    assert name_reasons("d111111abcdef8.cloudfront.net") == []  # cloudfront.net is a public suffix


# ------------------------------------------------------------------------ detect
def test_base32_tunnel_is_flagged_name_by_name() -> None:
    rng = random.Random(3)
    names = [f"{b32_label(rng, 20)}.{i}.t.exfil.example" for i in range(200)]
    obs = [Observation(n, T0 + i * 0.2, T0 + i * 0.2) for i, n in enumerate(names)]
    obs.append(Observation("www.exfil.example", T0, T0 + 100, 3))
    findings = detect(obs)
    flagged = flagged_names(findings)
    assert set(names) <= set(flagged)
    kinds = {f.kind for f in findings}
    assert "base32" in kinds and "burst" in kinds
    burst = next(f for f in findings if f.kind == "burst")
    assert burst.domain == "exfil.example"
    assert len(burst.names) == 201 and burst.lookups == 203
    # A handful of encoded-looking labels taints nothing that has no long label.
    assert all(f.kind in ("burst", "volume") for f in flagged["www.exfil.example"])


def test_few_encoded_names_flag_their_lookalikes() -> None:
    rng = random.Random(5)
    chunks = [b32_label(rng, 20) for _ in range(8)]
    words = "notarandomlabel-but-long"
    obs = [Observation(f"{c}.leak.example", T0 + i * 600, T0 + i * 600) for i, c in enumerate(chunks)]
    obs += [Observation(f"{words}.leak.example", T0, T0), Observation("api.leak.example", T0, T0)]
    flagged = flagged_names(detect(obs))
    assert {f"{c}.leak.example" for c in chunks} <= set(flagged)
    assert f"{words}.leak.example" in flagged
    assert "api.leak.example" not in flagged


def test_hundreds_of_innocent_looking_names_in_a_minute_are_a_burst() -> None:
    obs = [Observation(f"node{i}.burst.example", T0 + i * 0.1, T0 + i * 0.1) for i in range(120)]
    findings = detect(obs)
    assert [f.kind for f in findings] == ["burst"]
    assert "120 new distinct names under burst.example within 60s" in findings[0].reason


def test_slow_growth_is_not_a_burst_but_volume_is_capped() -> None:
    slow = [Observation(f"node{i}.slow.example", T0 + i * 60.0, T0 + i * 60.0) for i in range(120)]
    assert detect(slow) == []
    many = [Observation(f"node{i}.many.example", T0 + i * 60.0, T0 + i * 60.0) for i in range(301)]
    assert [f.kind for f in detect(many)] == ["volume"]
    assert detect(many, Thresholds(max_names=1000)) == []


def test_burst_threshold_is_exclusive() -> None:
    th = Thresholds(burst_names=10, burst_window_s=60)
    ten = [Observation(f"h{i}.x.example", T0 + i, T0 + i) for i in range(10)]
    assert detect(ten, th) == []
    assert [f.kind for f in detect([*ten, Observation("h10.x.example", T0 + 59, T0 + 59)], th)] == ["burst"]
    # The same 11 names spread over more than the window are not a burst.
    spread = [Observation(f"h{i}.x.example", T0 + i * 7, T0 + i * 7) for i in range(11)]
    assert detect(spread, th) == []


def test_bursts_are_counted_per_registrable_domain() -> None:
    # 100 distinct github.io sites are 100 registrable domains, not one burst.
    obs = [Observation(f"www.user{i}.github.io", T0 + i * 0.1, T0 + i * 0.1) for i in range(100)]
    assert detect(obs) == []


def test_detect_accepts_tuples_and_merges_duplicates() -> None:
    findings = detect([("4f2a9c0e1b7d3a554f2a.x.example", T0, T0 + 1, 2),
                       ("4f2a9c0e1b7d3a554f2a.x.example", T0 - 5, T0, 3)])
    assert len(findings) == 1
    f = findings[0]
    assert (f.kind, f.lookups, f.first_seen, f.last_seen) == ("hex", 5, T0 - 5, T0 + 1)
    assert f.as_dict()["name_count"] == 1


_label_chars = st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=63)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(_label_chars, min_size=1, max_size=4),
                          st.floats(min_value=0, max_value=1e6)), max_size=40))
def test_detect_never_raises_and_only_names_what_it_was_given(items: list) -> None:
    obs = [Observation(".".join([*labels, "example", "com"]), T0 + t, T0 + t) for labels, t in items]
    names = {o.name for o in obs}
    for f in detect(obs):
        assert set(f.names) <= names
        assert f.names and f.lookups >= len(f.names)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_label_reasons_never_raises(label: str) -> None:
    for kind, detail in label_reasons(label):
        assert kind and detail
