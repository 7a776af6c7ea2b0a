"""Images, several images and videos with text: the dataset and collator, the image and video
datamodules (online video negatives too), and video reading (decord) and writing (PyAV)."""

from datamodules.vision_text.collator import PreferenceDataset, VisionPreferenceCollator, load_image
from datamodules.vision_text.image_module import ImagePreferenceDataModule
from datamodules.vision_text.video_io import read_video, sample_frame_indices, write_video
from datamodules.vision_text.video_module import VideoPreferenceDataModule
from datamodules.vision_text.video_negatives import VideoNegativeSettings, VideoVDPODataModule

__all__ = [
    "ImagePreferenceDataModule",
    "PreferenceDataset",
    "VideoNegativeSettings",
    "VideoPreferenceDataModule",
    "VideoVDPODataModule",
    "VisionPreferenceCollator",
    "load_image",
    "read_video",
    "sample_frame_indices",
    "write_video",
]
