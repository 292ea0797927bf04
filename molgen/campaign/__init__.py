"""Design campaigns: rounds of generate -> score -> select, stored in SQL, with an HTML report.

    from molgen.campaign import Campaign, CampaignConfig
    c = Campaign(CampaignConfig.from_yaml("examples/campaign_rna.yaml"), "runs/campaign_rna")
    c.run()
    c.samples_frame()        # pandas, one row per design
    write_report(c)          # molgen.campaign.report: a self-contained HTML page

Command line: ``molgen campaign run CONFIG.yaml [--dir DIR] [--overwrite]``, ``molgen campaign status DIR``,
``molgen report DIR [--out FILE]``.
"""

from molgen.campaign.config import CampaignConfig
from molgen.campaign.runner import Campaign

__all__ = ["Campaign", "CampaignConfig"]
