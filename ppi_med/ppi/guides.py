"""What a study knows beyond the image, turned into the regions a pseudo-intervention removes.

A saliency map alone cannot tell a shortcut that sits at the same place in every image (a watermark in a
corner) from evidence that does (GA round the fovea). Two kinds of knowledge can (docs/DESIGN.md section 4.3):

- **Annotations.** Where a record has a lesion or nodule outline ``A``, the evidence is ``A`` itself and
  whatever the model finds salient outside it is not evidence: :func:`annotation_regions`.
- **Sites.** A site's artefact is what the site's images of a class share and other sites' images of the same
  class lack. :class:`SitePrototypes` keeps a running mean of the saliency mask per (site, class) and gives,
  for each sample, the share of its site's salience that the other sites do not have:
  :func:`site_regions` splits the sample's own mask into that site-specific part and the rest.

Both return ``(evidence, nuisance)`` per sample: removing the evidence should lose the label (the negative
contrast ``x*``), removing the nuisance should keep it (the adversarial positive ``x'``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SitePrototypes", "annotation_regions", "site_regions"]


def annotation_regions(mask: torch.Tensor, annotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Evidence = the annotated finding; nuisance = the salient mask outside it.

    Args:
        mask: the saliency mask ``T(s)``, ``(N, C, *spatial)`` in ``[0, 1]``.
        annotation: the outline, broadcastable to ``mask`` (``(N, 1, *spatial)``), in ``[0, 1]``; all zeros
            for a record annotated as showing no finding.

    Returns:
        ``(evidence, nuisance)``, each shaped like ``mask``.
    """
    annotation = annotation.to(mask.dtype).expand_as(mask)
    return annotation, mask * (1 - annotation)


class SitePrototypes:
    """Running mean of the saliency mask per (site, class), and each site's specific part of it.

    ``P[s, y]`` is an exponential moving average of the (detached) masks of site ``s``'s samples of class ``y``.
    The site-specific part of ``(s, y)`` is ``relu(P[s, y] - O) / max(P[s, y], floor)`` with ``O`` the mean of the
    other sites' ``P[., y]``: 1 where only this site's images of the class are salient (a watermark at a fixed
    place), near 0 where every site's are (evidence shared across sites), and 0 until another site of the
    class has been seen. Lesions that move from eye to eye spread their salience thinly in every site's mean,
    so they do not turn site-specific.

    A mean of a few masks marks every lesion as specific to its site (each eye's lesion sits elsewhere), so a
    (site, class) counts only from ``min_count`` samples on; until then the mean is the plain average of the
    samples seen, and the exponential average takes over once ``1 / (1 - momentum)`` samples are in.

    Args:
        momentum: weight of the old mean at each update, once enough samples are in.
        floor: the smallest ``P`` the difference is divided by, so that rarely salient voxels stay near 0.
        min_count: samples of a (site, class) before its mean counts, for itself and for the other sites.
    """

    def __init__(self, momentum: float = 0.9, floor: float = 0.1, min_count: int = 16) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"site prototype momentum must lie in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.floor = float(floor)
        self.min_count = int(min_count)
        self.means: dict[tuple[str, int], torch.Tensor] = {}
        self.counts: dict[tuple[str, int], int] = {}

    def update(self, mask: torch.Tensor, sites: Sequence[str], y: torch.Tensor) -> None:
        """Fold a batch's masks ``(N, C, *spatial)`` into the means of their (site, class)."""
        mask = mask.detach()
        labels = [int(v) for v in y.tolist()]
        for key in sorted(set(zip(sites, labels))):
            rows = [i for i, k in enumerate(zip(sites, labels)) if k == key]
            seen = self.counts.get(key, 0)
            self.counts[key] = seen + len(rows)
            # a cumulative average first, then the exponential one
            keep = min(self.momentum, seen / (seen + len(rows)))
            batch_mean = mask[rows].mean(dim=0)
            old = self.means.get(key)
            self.means[key] = batch_mean if old is None else keep * old + (1 - keep) * batch_mean

    def specific(self, site: str, label: int) -> torch.Tensor | None:
        """The site-specific share of ``(site, label)``'s salience, or ``None`` while it or every other site of the
        class has fewer than ``min_count`` samples."""
        ready = {k: m for k, m in self.means.items() if self.counts[k] >= self.min_count}
        own = ready.get((site, label))
        others = [m for (s, c), m in ready.items() if c == label and s != site]
        if own is None or not others:
            return None
        rest = torch.stack(others).mean(dim=0)
        return (own - rest).clamp_min(0) / own.clamp_min(self.floor)


def site_regions(
    mask: torch.Tensor, sites: Sequence[str], y: torch.Tensor, prototypes: SitePrototypes
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evidence = the sample's salient mask less its site-specific part; nuisance = that site-specific part.

    Args:
        mask: the saliency mask ``T(s)``, ``(N, C, *spatial)``.
        sites: each sample's site.
        y: labels ``(N,)``.
        prototypes: the running means (updated by the caller).

    Returns:
        ``(evidence, nuisance)``; a sample whose class no other site has shown yet gets its whole mask as
        evidence and no nuisance.
    """
    specific = torch.zeros_like(mask)
    for i, (site, label) in enumerate(zip(sites, y.tolist())):
        part = prototypes.specific(site, int(label))
        if part is not None:
            specific[i] = part.to(mask.dtype)
    return mask * (1 - specific), mask * specific
