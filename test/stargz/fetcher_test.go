package stargz_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/reference"
	"github.com/containerd/stargz-snapshotter/cache"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/remote"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/pelletier/go-toml"
)

// TestStargzFetcherMultiRange drives stargz-snapshotter's own blob fetcher
// (fs/remote, the code under its FUSE reads), configured from the same
// resolver TOML, against starlingd: a read whose chunks are partly cached
// makes it ask for several ranges in one request, and it reads starlingd's
// multipart/byteranges answer with its own parser.
func TestStargzFetcherMultiRange(t *testing.T) {
	if _, err := exec.LookPath("docker-registry"); err != nil {
		t.Skipf("needs docker-registry: %v", err)
	}
	binDir := os.Getenv("STARLING_BIN")
	if binDir == "" {
		t.Skip("STARLING_BIN is not set (make test-stargz sets it)")
	}
	dir := t.TempDir()
	regAddr := startRegistry(t, dir)
	viaP2P := startCounter(t, regAddr)
	direct := startCounter(t, regAddr)
	sd := startStarlingd(t, dir, "node", filepath.Join(binDir, "starlingd"), "", viaP2P.addr)

	blob := make([]byte, 3<<20+1234)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range blob {
		blob[i] = byte(r.Uint32())
	}
	dg := pushBlob(t, regAddr, "stargz/blob", blob)

	var cfg service.Config
	tree, err := toml.Load(mirrorConfig(direct.addr, sd.proxy, viaP2P.addr))
	if err != nil {
		t.Fatal(err)
	}
	if err := tree.Unmarshal(&cfg); err != nil {
		t.Fatal(err)
	}
	hosts := resolver.RegistryHostsFromConfig(resolver.Config(cfg.ResolverConfig))
	refspec, err := reference.Parse(direct.addr + "/stargz/blob:latest")
	if err != nil {
		t.Fatal(err)
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.Digest(dg), Size: int64(len(blob))}
	const chunk = 50000 // fs/remote's default chunk size
	b, err := remote.NewResolver(config.BlobConfig{ChunkSize: chunk}, nil).Resolve(context.Background(), hosts, refspec, desc, cache.NewMemoryCache())
	if err != nil {
		t.Fatalf("resolve the blob through the mirror: %v", err)
	}
	defer b.Close()

	read := func(off, n int64) {
		t.Helper()
		p := make([]byte, n)
		if k, err := b.ReadAt(p, off); err != nil || int64(k) != n || !bytes.Equal(p, blob[off:off+n]) {
			t.Fatalf("ReadAt(%d, %d): %d bytes, %v, equal %v", off, n, k, err, bytes.Equal(p[:max(k, 0)], blob[off:off+int64(max(k, 0))]))
		}
	}
	// Chunks 2 and 5 first, then a read over chunks 1 to 6: the fetcher
	// asks for 1, 3-4 and 6 in one request.
	read(2*chunk+10, 100)
	read(5*chunk+10, 100)
	read(chunk, 6*chunk)
	// And over the 1 MiB piece boundaries, with cached chunks between.
	read(20*chunk, 10)
	read(22*chunk, 10)
	read(19*chunk, 5*chunk)

	log := sd.proc.log()
	for _, want := range []string{
		fmt.Sprintf(`range="bytes=%d-%d,%d-%d,%d-%d"`, chunk, 2*chunk-1, 3*chunk, 5*chunk-1, 6*chunk, 7*chunk-1),
		fmt.Sprintf(`range="bytes=%d-%d,%d-%d,%d-%d"`, 19*chunk, 20*chunk-1, 21*chunk, 22*chunk-1, 23*chunk, 24*chunk-1),
	} {
		if !strings.Contains(log, want) {
			t.Errorf("starlingd never saw the multi-range request %s; its requests:\n%s", want, grepLines(log, "proxy request"))
		}
	}
	// What starlingd sent is the chunks asked for (and the part headers),
	// not the whole blob that a 200 answer to several ranges would be.
	if sent := metric(t, sd.metrics, `starling_proxy_bytes_total{path="p2p"}`); sent > 1<<20 {
		t.Errorf("starlingd sent %v bytes for reads of under 1 MiB", sent)
	}
	if got := direct.blobBytes(dg); got != 0 {
		t.Errorf("the fetcher took %d bytes from the registry without the mirror", got)
	}
	if viaP2P.blobBytes(dg) == 0 {
		t.Error("nothing reached the registry through starlingd")
	}
	t.Logf("registry: %d of %d blob bytes through starlingd; starlingd: %v p2p requests, %v bytes sent", viaP2P.blobBytes(dg), len(blob),
		metric(t, sd.metrics, `starling_proxy_requests_total{path="p2p"}`), metric(t, sd.metrics, `starling_proxy_bytes_total{path="p2p"}`))
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// pushBlob uploads b to repo in one PUT and returns its digest.
func pushBlob(t *testing.T, reg, repo string, b []byte) string {
	t.Helper()
	sum := sha256.Sum256(b)
	dg := "sha256:" + hex.EncodeToString(sum[:])
	resp, err := http.Post("http://"+reg+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusAccepted || loc == "" {
		t.Fatalf("start upload: %d", resp.StatusCode)
	}
	if !strings.HasPrefix(loc, "http") {
		loc = "http://" + reg + loc
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	req, _ := http.NewRequest(http.MethodPut, loc+sep+"digest="+dg, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("finish upload: %d", resp.StatusCode)
	}
	return dg
}
