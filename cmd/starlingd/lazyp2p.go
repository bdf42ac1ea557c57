package main

import (
	"context"
	"io"
	"log/slog"
	"sync"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/layer"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/registry"
)

// p2pFetchers makes the snapshotter read layer blobs through the peer: a
// lazy pull on one node then leaves pieces that other nodes fetch from it.
// The origin side of those tasks is the registry client, with its auth,
// mirrors and retries.
func p2pFetchers(p *peer.Peer, client *registry.Client) layer.FetcherFactory {
	return func(repo name.Repository, desc v1.Descriptor) blob.Fetcher {
		direct := &blob.RegistryFetcher{Client: client, Repo: repo, Digest: desc.Digest}
		return &p2pFetcher{p: p, direct: direct, req: peer.Request{
			TaskID: desc.Digest.String(),
			URL:    registry.BlobURL(repo, desc.Digest),
			Digest: desc.Digest.String(),
			Length: desc.Size,
			Source: sizedSource{Fetcher: direct, size: desc.Size},
		}}
	}
}

type sizedSource struct {
	blob.Fetcher
	size int64
}

func (s sizedSource) Size(context.Context) (int64, error) { return s.size, nil }

type p2pFetcher struct {
	p      *peer.Peer
	direct blob.Fetcher
	req    peer.Request

	mu sync.Mutex
	d  *peer.Download
}

func (f *p2pFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	f.mu.Lock()
	d := f.d
	if d == nil {
		var err error
		d, err = f.p.Open(ctx, f.req)
		if err != nil {
			f.mu.Unlock()
			// The layer still works without the P2P network.
			slog.Warn("layer through the peer failed, reading the registry directly", "blob", f.req.TaskID, "err", err)
			return f.direct.Fetch(ctx, off, length)
		}
		f.d = d
	}
	f.mu.Unlock()
	return d.Fetch(ctx, off, length)
}
