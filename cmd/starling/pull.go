package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/images"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/pkg/progress"
	"github.com/starling-dev/starling/pkg/registry/dockerhosts"
)

func init() { subcommands = append(subcommands, newPullCmd) }

type pullLayer struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
	Lazy   bool   `json:"lazy"`
}

type pullOutput struct {
	Reference string      `json:"reference"`
	Digest    string      `json:"digest"`
	Layers    []pullLayer `json:"layers"`
	Seconds   float64     `json:"seconds"`
}

func newPullCmd() *cobra.Command {
	var address, namespace, snapshotter, platform string
	cmd := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull an image into containerd lazily, with the starling snapshotter",
		Long: `Pull an image into containerd with the starling snapshotter, passing each
layer's image reference, digest and TOC digest to the snapshotter, so that
eStargz layers are mounted lazily instead of downloaded (the counterpart of
ctr-remote image rpull). Then: ctr run --snapshotter starling REF ID CMD.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			start := time.Now()
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			refName, err := name.ParseReference(args[0], name.WeakValidation)
			if err != nil {
				return fmt.Errorf("parse reference %q: %w", args[0], err)
			}
			ref := refName.Name()
			ctx := namespaces.WithNamespace(cmd.Context(), namespace)
			client, err := containerd.New(address, containerd.WithTimeout(10*time.Second))
			if err != nil {
				return fmt.Errorf("connect to containerd at %s: %w", address, err)
			}
			defer client.Close()

			prog := progress.New(os.Stderr, progress.ModeFor(g.output, os.Stderr))
			if g.output == "json" {
				prog = progress.New(os.Stderr, progress.Quiet)
			}
			var mu sync.Mutex
			tasks := map[string]*progress.Task{}
			var order []ocispec.Descriptor
			track := func(h images.Handler) images.Handler {
				return images.HandlerFunc(func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
					children, err := h.Handle(ctx, desc)
					if err == nil && images.IsManifestType(desc.MediaType) {
						mu.Lock()
						for i, c := range children {
							if images.IsLayerType(c.MediaType) {
								if _, ok := tasks[c.Digest.String()]; !ok {
									tasks[c.Digest.String()] = prog.Task(c.Digest.String(), fmt.Sprintf("layer %d %.19s", len(order)+1, c.Digest), c.Size)
									order = append(order, children[i])
								}
							}
						}
						mu.Unlock()
					}
					return children, err
				})
			}
			opts := []containerd.RemoteOpt{
				containerd.WithResolver(dockerhosts.Resolver(cfg.Resolver, nil)),
				containerd.WithPullUnpack,
				containerd.WithPullSnapshotter(snapshotter),
				containerd.WithImageHandlerWrapper(func(h images.Handler) images.Handler {
					return track(snapshotters.AppendInfoHandlerWrapper(ref)(h))
				}),
			}
			if platform != "" {
				opts = append(opts, containerd.WithPlatform(platform))
			}
			img, err := client.Pull(ctx, ref, opts...)
			if err != nil {
				for _, t := range tasks {
					t.Done(err)
				}
				prog.Wait()
				return fmt.Errorf("pull %s: %w", ref, err)
			}
			out := pullOutput{Reference: ref, Digest: img.Target().Digest.String()}
			// Which layers went remote: their committed snapshots say so.
			diffIDs, err := img.RootFS(ctx)
			if err == nil {
				sn := client.SnapshotService(snapshotter)
				for i, d := range order {
					l := pullLayer{Digest: d.Digest.String(), Size: d.Size}
					if i < len(diffIDs) {
						chain := identity.ChainID(diffIDs[:i+1]).String()
						if info, err := sn.Stat(ctx, chain); err == nil {
							_, l.Lazy = info.Labels["containerd.io/snapshot/starling.remote"]
						}
					}
					out.Layers = append(out.Layers, l)
					if t := tasks[l.Digest]; t != nil {
						if !l.Lazy {
							t.Add(d.Size)
						}
						t.Done(nil)
					}
				}
			}
			prog.Wait()
			out.Seconds = time.Since(start).Seconds()
			if g.output == "json" {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			lazy := 0
			for _, l := range out.Layers {
				if l.Lazy {
					lazy++
				}
			}
			fmt.Printf("pulled %s (%s): %d of %d layers lazy, in %.2fs\n", ref, out.Digest, lazy, len(out.Layers), out.Seconds)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&address, "address", "/run/containerd/containerd.sock", "containerd's socket")
	f.StringVarP(&namespace, "namespace", "n", "default", "containerd namespace")
	f.StringVar(&snapshotter, "snapshotter", "starling", "snapshotter to unpack with")
	f.StringVar(&platform, "platform", "", "platform to pull (default: this host's)")
	return cmd
}
