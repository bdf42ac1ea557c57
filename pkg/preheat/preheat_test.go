package preheat

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/proxy"
	"github.com/starling-dev/starling/pkg/registry"
)

// multiImage pushes an index of two images, linux/amd64 and linux/arm64/v8,
// that share their base layer, and returns the reference and each
// platform's blob digests (config and layers).
func multiImage(t *testing.T, reg *testenv.Registry, repoTag string) (string, map[string][]string) {
	t.Helper()
	base, err := random.Layer(300<<10, "application/vnd.oci.image.layer.v1.tar+gzip")
	if err != nil {
		t.Fatal(err)
	}
	blobs := map[string][]string{}
	idx := v1.ImageIndex(empty.Index)
	for _, p := range []v1.Platform{{OS: "linux", Architecture: "amd64"}, {OS: "linux", Architecture: "arm64", Variant: "v8"}} {
		img, err := random.Image(200<<10, 2)
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, base); err != nil {
			t.Fatal(err)
		}
		cf, _ := img.ConfigFile()
		cf.OS, cf.Architecture, cf.Variant = p.OS, p.Architecture, p.Variant
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			t.Fatal(err)
		}
		m, err := img.Manifest()
		if err != nil {
			t.Fatal(err)
		}
		ds := []string{m.Config.Digest.String()}
		for _, l := range m.Layers {
			ds = append(ds, l.Digest.String())
		}
		blobs[p.String()] = ds
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &p}})
	}
	c := registry.New(registry.DefaultConfig())
	ref, err := c.ParseReference(reg.Addr + "/" + repoTag)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Write(context.Background(), ref, idx); err != nil {
		t.Fatal(err)
	}
	return ref.Name(), blobs
}

func TestPlan(t *testing.T) {
	reg := testenv.StartRegistry(t)
	image, want := multiImage(t, reg, "preheat/multi:1")
	c := registry.New(registry.DefaultConfig())
	ref, err := c.ParseReference(image)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	hdr := http.Header{"Authorization": {"Bearer x"}, "Cookie": {"s=1"}, "Accept": {"*/*"}}

	plan, err := NewPlan(ctx, c, ref, nil, hdr)
	if err != nil {
		t.Fatal(err)
	}
	union := map[string]bool{}
	for _, ds := range want {
		for _, d := range ds {
			union[d] = true
		}
	}
	if got := digests(plan); !equalSets(got, union) {
		t.Errorf("all platforms: blobs %v, want %v", got, keys(union))
	}
	if len(plan.Blobs) != len(union) {
		t.Errorf("%d blobs planned for %d distinct digests: the shared layer is not deduplicated", len(plan.Blobs), len(union))
	}
	for _, b := range plan.Blobs {
		w := b.Work
		wantURL := "http://" + reg.Addr + "/v2/preheat/multi/blobs/" + w.Digest
		if w.Url != wantURL {
			t.Errorf("URL %s, want %s", w.Url, wantURL)
		}
		// The task the proxy serves the blob of this registry from.
		if id, _ := proxy.RegistryTaskID(must(url.Parse(wantURL))); w.TaskId != id {
			t.Errorf("task ID %s of blob %s, want the proxy's %s", w.TaskId, w.Digest, id)
		}
		// No credential travels with the work.
		if len(w.Header) != 1 || w.Header["Accept"] == nil {
			t.Errorf("header of %s: %v, want Accept only", w.Digest, w.Header)
		}
		// The URL is what a seed fetches: it must serve the blob.
		resp, err := http.Get(w.Url)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		sum := sha256.Sum256(body)
		if got := "sha256:" + hex.EncodeToString(sum[:]); got != w.Digest || int64(len(body)) != b.Size {
			t.Errorf("%s serves %d bytes of %s; want %d bytes of %s", w.Url, len(body), got, b.Size, w.Digest)
		}
	}
	shared := 0
	for _, b := range plan.Blobs {
		if len(b.Platforms) == 2 {
			shared++
		}
	}
	if shared != 1 {
		t.Errorf("%d blobs listed under both platforms, want 1 (the base layer)", shared)
	}

	// One platform; a spec without variant matches the arm64/v8 image.
	arm, _ := v1.ParsePlatform("linux/arm64")
	plan, err = NewPlan(ctx, c, ref, []*v1.Platform{arm}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := digests(plan); !equalSets(got, setOf(want["linux/arm64/v8"])) {
		t.Errorf("linux/arm64: blobs %v, want %v", got, want["linux/arm64/v8"])
	}

	// A platform the index lacks is an error, not an empty preheat.
	s390, _ := v1.ParsePlatform("linux/s390x")
	if _, err := NewPlan(ctx, c, ref, []*v1.Platform{s390}, nil); err == nil || !strings.Contains(err.Error(), "linux/s390x") {
		t.Errorf("missing platform: err = %v", err)
	}

	// A single image (by digest) gives its own blobs.
	amd := reg.Addr + "/preheat/multi@" + platformDigest(t, c, ref, "linux/amd64")
	ref2, err := c.ParseReference(amd)
	if err != nil {
		t.Fatal(err)
	}
	plan, err = NewPlan(ctx, c, ref2, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := digests(plan); !equalSets(got, setOf(want["linux/amd64"])) {
		t.Errorf("single image: blobs %v, want %v", got, want["linux/amd64"])
	}
	if plan.Blobs[0].Kind != "config" {
		t.Errorf("first blob is a %s, want the config", plan.Blobs[0].Kind)
	}
}

func TestFetchedBytes(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		length, size    int64
		pieces, fetched int32
		seeds           int32
		want            int64
	}{
		{10 * mib, 10 * mib, 3, 0, 0, 0},
		{10 * mib, 10 * mib, 3, 1, 0, 4 * mib},
		{10 * mib, 10 * mib, 3, 2, 0, 8 * mib},
		{10 * mib, 10 * mib, 3, 3, 0, 10 * mib},
		{10 * mib, 10 * mib, 3, 1, 1, 10 * mib},
		{10 * mib, 10 * mib, 10, 4, 0, 4 * mib}, // 1 MiB pieces
		{0, 5 * mib, 0, 0, 0, 0},                // not known to the scheduler yet
	} {
		s := &schedulerpb.TaskState{Length: c.length, Pieces: c.pieces, Fetched: c.fetched, SeedsComplete: c.seeds}
		if got := FetchedBytes(s, c.size); got != c.want {
			t.Errorf("%+v: %d bytes, want %d", c, got, c.want)
		}
	}
}

func digests(p *Plan) map[string]bool {
	m := map[string]bool{}
	for _, b := range p.Blobs {
		m[b.Work.Digest] = true
	}
	return m
}

func setOf(ss []string) map[string]bool {
	m := map[string]bool{}
	for _, s := range ss {
		m[s] = true
	}
	return m
}

func keys(m map[string]bool) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func equalSets(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

func platformDigest(t *testing.T, c *registry.Client, ref interface{ Name() string }, platform string) string {
	t.Helper()
	r, err := c.ParseReference(ref.Name())
	if err != nil {
		t.Fatal(err)
	}
	d, err := c.Get(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := d.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range im.Manifests {
		if m.Platform != nil && m.Platform.String() == platform {
			return m.Digest.String()
		}
	}
	t.Fatalf("no %s in the index", platform)
	return ""
}

// TestJobSeedGone: the seed leaves while the registry is stalled mid-blob;
// the job asks again for the stalled blobs, learns there is no seed left,
// and says so instead of waiting for ever.
func TestJobSeedGone(t *testing.T) {
	reg := testenv.StartRegistry(t)
	count := testenv.StartCountingProxy(t, reg.Addr)
	multiImage(t, reg, "preheat/gone:1")
	sched, srv := testenv.StartScheduler(t)
	s := srv.Scheduler()

	// Without a seed the scheduler says so at once.
	plan := planOf(t, count.Addr+"/preheat/gone:1")
	job, err := NewJob(plan, Options{Schedulers: []string{sched}})
	if err != nil {
		t.Fatal(err)
	}
	var nse *NoSeedError
	if err := job.Enqueue(context.Background()); !errors.As(err, &nse) || nse.Scheduler != sched {
		t.Fatalf("no seed: err = %v", err)
	}
	job.Close()

	seed, err := peer.New(peer.Options{Root: t.TempDir(), Seed: true, Schedulers: []string{sched}, UploadListen: "127.0.0.1:0",
		AdvertiseIP: "127.0.0.1", AnnounceInterval: 100 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := seed.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { seed.Close() })
	testenv.WaitFor(t, 10*time.Second, "the seed to announce itself", func() bool {
		_, n, _ := s.Stats()
		return n == 1
	})

	count.Stall()
	job, err = NewJob(plan, Options{Schedulers: []string{sched}, StallResend: 300 * time.Millisecond, PollInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if err := job.Enqueue(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, st := range job.Status() {
		if st.Seed != seed.ID() || st.Scheduler != sched {
			t.Fatalf("status after enqueue: %+v", st)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- job.Wait(ctx, nil) }()
	testenv.WaitFor(t, 20*time.Second, "the seed to ask the registry", func() bool {
		_, _, tasks := s.Stats()
		return tasks > 0 && count.Requests() > 0
	})
	seed.Close()
	err = <-done
	if !errors.As(err, &nse) || nse.Scheduler != sched {
		t.Errorf("after the seed left: err = %v", err)
	}
}

func planOf(t *testing.T, image string) *Plan {
	t.Helper()
	c := registry.New(registry.DefaultConfig())
	ref, err := c.ParseReference(image)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := NewPlan(context.Background(), c, ref, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return plan
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
