"""A torchrun DDP script: DistributedSampler.set_epoch, no_sync accumulation, rank-0 checkpoints."""
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler


def main(dataset, val_dataset, build_model):
    dist.init_process_group("nccl")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    model = DDP(build_model().cuda(local_rank), device_ids=[local_rank])
    sampler = DistributedSampler(dataset, shuffle=True)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=4, pin_memory=True)
    val_loader = DataLoader(val_dataset, batch_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    accum = 2
    for epoch in range(90):
        sampler.set_epoch(epoch)
        model.train()
        for i, (images, target) in enumerate(loader):
            images, target = images.cuda(non_blocking=True), target.cuda(non_blocking=True)
            if (i + 1) % accum != 0:
                with model.no_sync():
                    (criterion(model(images), target) / accum).backward()
                continue
            (criterion(model(images), target) / accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            model.eval()
            correct = 0
            with torch.no_grad():
                for images, target in val_loader:
                    correct += (model.module(images.cuda()).argmax(1) == target.cuda()).sum()
            print(epoch, correct.item() / len(val_dataset))
            torch.save(model.module.state_dict(), "checkpoint.pt")
        dist.barrier()
    dist.destroy_process_group()
