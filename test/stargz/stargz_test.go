// Package stargz_test runs the real stargz-snapshotter (built from its Go
// module by ./snapshotter) with the registry mirror configured the way
// Dragonfly's documentation configures it, pointed at starlingd's proxy,
// and checks that an eStargz image is lazily pulled and run with every
// layer byte coming through the P2P network.
//
// It drives binaries only: docker-registry, containerd, ctr-remote and
// runc from the system, starlingd, starling-scheduler and starling from
// $STARLING_BIN. It needs root and /dev/fuse.
package stargz_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// hello is the file the container reads.
const hello = "hello through starling's P2P network\n"

func TestStargzSnapshotterThroughStarlingd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (containerd, FUSE)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("needs /dev/fuse")
	}
	for _, b := range []string{"docker-registry", "containerd", "ctr-remote", "runc", "go"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("needs %s: %v", b, err)
		}
	}
	binDir := os.Getenv("STARLING_BIN")
	if binDir == "" {
		t.Skip("STARLING_BIN is not set (make test-stargz sets it)")
	}
	bin := func(name string) string {
		p := filepath.Join(binDir, name)
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return p
	}
	// Socket paths must stay short.
	dir, err := os.MkdirTemp("/tmp", "sgz")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unmountUnder(dir)
		if os.Getenv("STARGZ_TEST_KEEP") != "" {
			// Every daemon's log stays there, for a look after the run.
			t.Logf("kept %s", dir)
			return
		}
		os.RemoveAll(dir)
	})

	start := time.Now()
	snapshotterBin := filepath.Join(dir, "stargz-snapshotter")
	if out, err := exec.Command("go", "build", "-o", snapshotterBin, "./snapshotter").CombinedOutput(); err != nil {
		t.Fatalf("build the stargz snapshotter: %v\n%s", err, out)
	}
	t.Logf("stargz snapshotter built in %v", time.Since(start).Round(time.Millisecond))

	// The registry, and two counting proxies in front of it: the one
	// starlingd is told about (X-Dragonfly-Registry), and the one the
	// image is named by, which containerd and the snapshotter reach when
	// they do not go through the mirror.
	regAddr := startRegistry(t, dir)
	viaP2P := startCounter(t, regAddr)
	direct := startCounter(t, regAddr)

	// An image of busybox and a data layer, converted to eStargz by
	// starling convert and pushed straight to the registry.
	layout := filepath.Join(dir, "oci")
	writeImage(t, layout)
	emptyCfg := filepath.Join(dir, "starling.toml")
	os.WriteFile(emptyCfg, nil, 0o644)
	run(t, bin("starling"), "--config", emptyCfg, "convert", "--plain-http", "oci:"+layout+":v1", regAddr+"/stargz/app:v1")
	layers := manifestLayers(t, regAddr, "stargz/app", "v1")
	var total int64
	for _, l := range layers {
		total += l.Size
	}
	ref := direct.addr + "/stargz/app:v1"

	// A scheduler, so that the second node's peer finds the first.
	schedPort, schedHTTP := freePort(t), freePort(t)
	schedAddr := fmt.Sprintf("127.0.0.1:%d", schedPort)
	sched := startProc(t, dir, "scheduler", bin("starling-scheduler"), "--config", emptyCfg,
		"--listen", schedAddr, "--http", fmt.Sprintf("127.0.0.1:%d", schedHTTP))
	waitTCP(t, sched, schedAddr)

	type node struct {
		name string
		ctd  string // containerd's socket
		*starlingd
	}
	startNode := func(name string) *node {
		n := &node{name: name}
		root := filepath.Join(dir, name)
		n.starlingd = startStarlingd(t, dir, name, bin("starlingd"), schedAddr, viaP2P.addr)

		// The stargz snapshotter, configured as Dragonfly's documentation
		// says, with the mirror pointed at this node's starlingd.
		// Background fetch is off so that both nodes read the same chunks.
		sock := filepath.Join(root, "stargz.sock")
		snCfg := filepath.Join(root, "stargz.toml")
		os.WriteFile(snCfg, []byte("no_background_fetch = true\n\n"+mirrorConfig(direct.addr, n.proxy, viaP2P.addr)), 0o644)
		sn := startProc(t, dir, name+"-stargz", snapshotterBin, "--address", sock, "--config", snCfg,
			"--root", filepath.Join(root, "stargz"), "--log-level", "debug")
		waitFor(t, 30*time.Second, name+" stargz socket", func() bool {
			if sn.exited() {
				t.Fatalf("%s stargz snapshotter exited:\n%s", name, sn.log())
			}
			_, err := os.Stat(sock)
			return err == nil
		})

		n.ctd = filepath.Join(root, "containerd.sock")
		ctdCfg := filepath.Join(root, "containerd.toml")
		os.WriteFile(ctdCfg, []byte(fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[proxy_plugins.stargz]
  type = "snapshot"
  address = %q
`, filepath.Join(root, "ctd-root"), filepath.Join(root, "ctd-state"), n.ctd, n.ctd+".ttrpc", sock)), 0o644)
		ctd := startProc(t, dir, name+"-containerd", "containerd", "--config", ctdCfg, "--log-level", "info")
		waitFor(t, 30*time.Second, name+" containerd", func() bool {
			if ctd.exited() {
				t.Fatalf("%s containerd exited:\n%s", name, ctd.log())
			}
			return exec.Command("ctr", "--address", n.ctd, "version").Run() == nil
		})
		t.Cleanup(func() {
			out, _ := exec.Command("ctr", "--address", n.ctd, "task", "ls", "-q").Output()
			for _, id := range strings.Fields(string(out)) {
				_ = exec.Command("ctr", "--address", n.ctd, "task", "kill", "-s", "SIGKILL", id).Run()
			}
		})
		return n
	}

	// runOn lazily pulls the image on a node and runs a container that
	// copies the file to a host directory.
	runOn := func(n *node) time.Duration {
		t0 := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if out, err := exec.CommandContext(ctx, "ctr-remote", "--address", n.ctd, "image", "rpull", "--plain-http", ref).CombinedOutput(); err != nil {
			t.Fatalf("%s: rpull: %v\n%s", n.name, err, out)
		}
		outDir := filepath.Join(dir, n.name, "out")
		os.MkdirAll(outDir, 0o755)
		out, err := exec.CommandContext(ctx, "ctr-remote", "--address", n.ctd, "run", "--rm", "--snapshotter", "stargz",
			"--mount", "type=bind,src="+outDir+",dst=/out,options=rbind:rw",
			ref, n.name+"-c", "/bin/sh", "-c", "cat /data/hello.txt > /out/hello.txt").CombinedOutput()
		if err != nil {
			t.Fatalf("%s: run: %v\n%s", n.name, err, out)
		}
		got, err := os.ReadFile(filepath.Join(outDir, "hello.txt"))
		if err != nil || string(got) != hello {
			t.Fatalf("%s: the container read %q (%v), want %q", n.name, got, err, hello)
		}
		return time.Since(t0)
	}
	layerBytes := func(c *counter) (n int64) {
		for _, l := range layers {
			n += c.blobBytes(l.Digest)
		}
		return n
	}

	n1 := startNode("node1")
	d1 := runOn(n1)
	p2pReqs := metric(t, n1.metrics, `starling_proxy_requests_total{path="p2p"}`)
	t.Logf("node1: pull and run %v; starlingd proxy: %v p2p requests; registry: %d of %d layer bytes through starlingd, %d directly",
		d1.Round(time.Millisecond), p2pReqs, layerBytes(viaP2P), total, layerBytes(direct))
	if p2pReqs == 0 {
		t.Errorf("no request went through starlingd's P2P path:\n%s", n1.proc.log())
	}
	if layerBytes(viaP2P) == 0 {
		t.Error("no layer byte reached the registry through starlingd")
	}
	if b := layerBytes(direct); b != 0 {
		t.Errorf("the snapshotter fetched %d layer bytes from the registry without the mirror", b)
	}
	if layerBytes(viaP2P) >= total {
		t.Logf("note: the whole image (%d bytes) was fetched, not lazily", total)
	}

	// A second node with the same setup: its reads come from the first
	// node's peer, none from the registry.
	before := layerBytes(viaP2P)
	n2 := startNode("node2")
	d2 := runOn(n2)
	t.Logf("node2: pull and run %v; starlingd proxy: %v p2p requests, %v piece bytes from node1's peer; registry: %d more layer bytes through starlingd, %d directly",
		d2.Round(time.Millisecond), metric(t, n2.metrics, `starling_proxy_requests_total{path="p2p"}`),
		metric(t, n2.metrics, `starling_peer_piece_bytes_total{source="parent"}`), layerBytes(viaP2P)-before, layerBytes(direct))
	if got := layerBytes(viaP2P) - before; got != 0 {
		t.Errorf("the second node took %d layer bytes from the registry, want 0", got)
	}
	if b := layerBytes(direct); b != 0 {
		t.Errorf("%d layer bytes were fetched from the registry without the mirror", b)
	}
	for _, l := range layers {
		t.Logf("layer %s (%d bytes): %d bytes through starlingd", l.Digest, l.Size, viaP2P.blobBytes(l.Digest))
	}
}

// mirrorConfig is the stargz snapshotter's resolver section as Dragonfly's
// documentation writes it: registry's blobs through the mirror at proxy,
// which fetches them from upstream (X-Dragonfly-Registry).
func mirrorConfig(registry, proxy, upstream string) string {
	return fmt.Sprintf(`[[resolver.host.%q.mirrors]]
host = %q
insecure = true
header = { X-Dragonfly-Registry = ["http://%s"] }
`, registry, proxy, upstream)
}

// starlingd is one starlingd with its peer and proxy on (no snapshotter).
type starlingd struct {
	proxy   string // host:port of the proxy
	metrics string
	proc    *proc
}

// startStarlingd starts a starlingd whose upstream registry, a plain HTTP
// one, is upstream; schedAddr "" runs the peer without a scheduler.
func startStarlingd(t *testing.T, dir, name, bin, schedAddr, upstream string) *starlingd {
	t.Helper()
	root := filepath.Join(dir, name)
	os.MkdirAll(root, 0o700)
	s := &starlingd{proxy: fmt.Sprintf("127.0.0.1:%d", freePort(t)), metrics: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	health := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := filepath.Join(root, "starlingd.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("[resolver.host.%q]\ninsecure = true\n", upstream)), 0o644)
	args := []string{"--config", cfg, "--root", filepath.Join(root, "starling"), "--snapshotter=false",
		"--advertise-ip", "127.0.0.1", "--log-level", "debug",
		"--upload-listen", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "--proxy-listen", s.proxy,
		"--metrics-listen", s.metrics, "--health-listen", health}
	if schedAddr != "" {
		args = append(args, "--scheduler", schedAddr)
	}
	s.proc = startProc(t, dir, name+"-starlingd", bin, args...)
	waitFor(t, 30*time.Second, name+" starlingd healthy", func() bool {
		if s.proc.exited() {
			t.Fatalf("%s starlingd exited:\n%s", name, s.proc.log())
		}
		// nydusd's and Dragonfly's ping_url.
		resp, err := http.Get("http://" + health + "/healthy")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return s
}

// proc is a daemon the test started; it is stopped when the test ends.
type proc struct {
	cmd  *exec.Cmd
	out  *os.File
	done chan struct{}
}

func startProc(t *testing.T, dir, name, bin string, args ...string) *proc {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{cmd: cmd, out: f, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
		if t.Failed() {
			t.Logf("--- %s log (last 4 KiB):\n%s", name, tail(p.log(), 4096))
		}
		f.Close()
	})
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) log() string {
	b, _ := os.ReadFile(p.out.Name())
	return string(b)
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func run(t *testing.T, bin string, args ...string) string {
	t.Helper()
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, out)
	}
	return string(out)
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	for end := time.Now().Add(d); ; time.Sleep(100 * time.Millisecond) {
		if ok() {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
	}
}

func waitTCP(t *testing.T, p *proc, addr string) {
	t.Helper()
	waitFor(t, 20*time.Second, addr, func() bool {
		if p.exited() {
			t.Fatalf("exited before listening on %s:\n%s", addr, p.log())
		}
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

// startRegistry runs Debian's docker-registry on a free loopback port.
func startRegistry(t *testing.T, dir string) string {
	t.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := filepath.Join(dir, "registry.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
http:
  addr: %s
  secret: starling-test
`, filepath.Join(dir, "registry"), addr)), 0o644)
	p := startProc(t, dir, "registry", "docker-registry", "serve", cfg)
	waitTCP(t, p, addr)
	return addr
}

// counter is a reverse proxy in front of the registry that counts the
// body bytes it sends per blob.
type counter struct {
	addr     string
	requests atomic.Int64
	mu       sync.Mutex
	byBlob   map[string]int64
}

func startCounter(t *testing.T, upstream string) *counter {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &counter{addr: l.Addr().String(), byBlob: map[string]int64{}}
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: upstream})
	rp.ErrorLog = log.New(io.Discard, "", 0)
	rp.ModifyResponse = func(resp *http.Response) error {
		if i := strings.Index(resp.Request.URL.Path, "/blobs/"); i >= 0 && resp.Request.Method == http.MethodGet {
			resp.Body = &countBody{ReadCloser: resp.Body, c: c, blob: resp.Request.URL.Path[i+len("/blobs/"):]}
		}
		return nil
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.requests.Add(1)
		rp.ServeHTTP(w, r)
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
	return c
}

func (c *counter) blobBytes(digest string) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.byBlob[digest]
}

type countBody struct {
	io.ReadCloser
	c    *counter
	blob string
}

func (b *countBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.c.mu.Lock()
	b.c.byBlob[b.blob] += int64(n)
	b.c.mu.Unlock()
	return n, err
}

// metric reads one sample from a Prometheus text endpoint.
func metric(t *testing.T, addr, series string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			f, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f
		}
	}
	return 0
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// manifestLayers reads an image's manifest straight from the registry.
func manifestLayers(t *testing.T, reg, repo, tag string) []descriptor {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+reg+"/v2/"+repo+"/manifests/"+tag, nil)
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m struct {
		Layers []descriptor `json:"layers"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil || len(m.Layers) == 0 {
		t.Fatalf("manifest of %s:%s: status %d, %v", repo, tag, resp.StatusCode, err)
	}
	for _, l := range m.Layers {
		if l.Annotations["containerd.io/snapshot/stargz/toc.digest"] == "" {
			t.Fatalf("layer %s is not eStargz (no TOC digest annotation)", l.Digest)
		}
	}
	return m.Layers
}

// writeImage writes an OCI layout holding one linux image, tagged v1: the
// host's static busybox, and a data layer with the file the container
// reads and 8 MiB it never reads.
func writeImage(t *testing.T, dir string) {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("needs a static /bin/busybox: %v", err)
	}
	type entry struct {
		name, link string
		data       []byte
		mode       int64
	}
	layer := func(es []entry) []byte {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, e := range es {
			h := &tar.Header{Name: e.name, Mode: e.mode, ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
			switch {
			case e.link != "":
				h.Typeflag, h.Linkname = tar.TypeSymlink, e.link
			case strings.HasSuffix(e.name, "/"):
				h.Typeflag = tar.TypeDir
			default:
				h.Typeflag, h.Size = tar.TypeReg, int64(len(e.data))
			}
			if err := tw.WriteHeader(h); err != nil {
				t.Fatal(err)
			}
			tw.Write(e.data)
		}
		tw.Close()
		return buf.Bytes()
	}
	base := []entry{{name: "bin/", mode: 0o755}, {name: "bin/busybox", data: bb, mode: 0o755}}
	for _, app := range []string{"sh", "cat", "ls", "sha256sum"} {
		base = append(base, entry{name: "bin/" + app, link: "busybox", mode: 0o777})
	}
	big := make([]byte, 8<<20)
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(big); i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			big[i+j] = byte(v >> (8 * j))
		}
	}
	data := []entry{{name: "data/", mode: 0o755}, {name: "data/big", data: big, mode: 0o644},
		{name: "data/hello.txt", data: []byte(hello), mode: 0o644}, {name: "tmp/", mode: 0o1777}, {name: "out/", mode: 0o755}}

	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		t.Fatal(err)
	}
	put := func(b []byte, mt string) descriptor {
		sum := sha256.Sum256(b)
		h := hex.EncodeToString(sum[:])
		if err := os.WriteFile(filepath.Join(blobs, h), b, 0o644); err != nil {
			t.Fatal(err)
		}
		return descriptor{MediaType: mt, Digest: "sha256:" + h, Size: int64(len(b))}
	}
	var ls []descriptor
	var diffIDs []string
	for _, es := range [][]entry{base, data} {
		d := put(layer(es), "application/vnd.oci.image.layer.v1.tar")
		ls = append(ls, d)
		diffIDs = append(diffIDs, d.Digest)
	}
	cfg, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux",
		"config": map[string]any{"Cmd": []string{"/bin/sh"}, "Env": []string{"PATH=/bin"}},
		"rootfs": map[string]any{"type": "layers", "diff_ids": diffIDs},
	})
	man, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": put(cfg, "application/vnd.oci.image.config.v1+json"), "layers": ls,
	})
	md := put(man, "application/vnd.oci.image.manifest.v1+json")
	md.Annotations = map[string]string{"org.opencontainers.image.ref.name": "v1"}
	idx, _ := json.Marshal(map[string]any{"schemaVersion": 2, "manifests": []descriptor{md}})
	os.WriteFile(filepath.Join(dir, "index.json"), idx, 0o644)
	os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644)
}

// unmountUnder lazily unmounts every mount below dir, deepest first.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mps []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir) {
			mps = append(mps, f[4])
		}
	}
	for i := len(mps) - 1; i >= 0; i-- {
		_ = exec.Command("umount", "-l", mps[i]).Run()
	}
}
