package blob

import (
	"context"
	"io"

	"github.com/prometheus/client_golang/prometheus"
)

var (
	metricVerifyFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "starling_chunk_verify_failures_total",
		Help: "Chunks whose bytes did not match their digest.",
	})
	metricFetchedBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "starling_fetched_bytes_total",
		Help: "Bytes of layer blobs received from fetchers (registry or peer), TOCs included.",
	})
	metricFetchRequests = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "starling_fetch_requests_total",
		Help: "Range requests made for layer blobs.",
	})
)

func init() { prometheus.MustRegister(metricVerifyFailures, metricFetchedBytes, metricFetchRequests) }

// Counted wraps a Fetcher so that what it returns shows in the metrics. A
// DirectFetcher stays one.
func Counted(f Fetcher) Fetcher {
	if d, ok := f.(DirectFetcher); ok {
		return countedDirect{countedFetcher{f}, d}
	}
	return countedFetcher{f}
}

type countedDirect struct {
	countedFetcher
	d DirectFetcher
}

func (c countedDirect) FetchDirect(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	metricFetchRequests.Inc()
	rc, err := c.d.FetchDirect(ctx, off, length)
	if err != nil {
		return nil, err
	}
	return countedBody{rc}, nil
}

type countedFetcher struct{ f Fetcher }

// Unwrap returns the counted fetcher, so that what it implements
// (SourceStats) is still found.
func (c countedFetcher) Unwrap() Fetcher { return c.f }

func (c countedFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	metricFetchRequests.Inc()
	rc, err := c.f.Fetch(ctx, off, length)
	if err != nil {
		return nil, err
	}
	return countedBody{rc}, nil
}

type countedBody struct{ io.ReadCloser }

func (b countedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	metricFetchedBytes.Add(float64(n))
	return n, err
}
